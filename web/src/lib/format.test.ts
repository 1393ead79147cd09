import { describe, expect, it } from 'vitest';
import { ago, bytes, mib, parseLabels, percent, sparkline, sshCommand } from './format';

describe('format', () => {
	it('sizes', () => {
		expect(mib(512)).toBe('512 MiB');
		expect(mib(2048)).toBe('2 GiB');
		expect(mib(1536)).toBe('1.5 GiB');
		expect(bytes(1024 * 1024 * 3)).toBe('3 MiB');
		expect(bytes(100)).toBe('100 B');
	});
	it('percent is bounded and safe on zero', () => {
		expect(percent(1, 4)).toBe(25);
		expect(percent(5, 4)).toBe(100);
		expect(percent(1, 0)).toBe(0);
	});
	it('ago', () => {
		const now = Date.parse('2026-01-01T00:10:00Z');
		expect(ago('2026-01-01T00:09:58Z', now)).toBe('just now');
		expect(ago('2026-01-01T00:09:30Z', now)).toBe('30 s ago');
		expect(ago('2026-01-01T00:05:00Z', now)).toBe('5 min ago');
		expect(ago(null, now)).toBe('never');
	});
	it('ssh command from the forward of port 22', () => {
		expect(sshCommand([{ guest_port: 22, host_port: 20001, host: '127.0.0.1' }], 'debian')).toBe(
			'ssh -p 20001 debian@127.0.0.1'
		);
		expect(sshCommand([{ guest_port: 80, host_port: 20002, host: 'h' }], 'debian')).toBeNull();
		// An image without an SSH login gets no command.
		expect(sshCommand([{ guest_port: 22, host_port: 20001, host: 'h' }], null)).toBeNull();
	});
	it('labels', () => {
		expect(parseLabels('env=dev\nteam = a,tier=web')).toEqual({ env: 'dev', team: 'a', tier: 'web' });
		expect(() => parseLabels('oops')).toThrow('label "oops" is not key=value');
	});
});

describe('sparkline', () => {
	it('scales values into the box, 0 at the bottom', () => {
		expect(sparkline([], 100, 20)).toBe('');
		expect(sparkline([0, 50, 100], 100, 20, 100)).toBe('0,20 50,10 100,0');
		// The largest value sets the top when it exceeds max.
		expect(sparkline([0, 200], 10, 10, 100)).toBe('0,10 10,0');
		expect(sparkline([5], 10, 10, 10)).toBe('0,5');
	});
});
