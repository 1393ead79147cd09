import { describe, expect, it } from 'vitest';
import { apply, outcome, type EnvExecEvent, type FanOut } from './fanout';

const vm = (id: string, name: string) => ({ vm_id: id, vm_name: name, image: 'tiny', arch: 'x86_64' });

describe('an environment run read as it streams', () => {
	it('gives each VM its own output and end, in the order they come', () => {
		const f: FanOut = { vms: [], done: null };
		const d = new Map<string, TextDecoder>();
		const lines: EnvExecEvent[] = [
			{ started: { vms: [vm('a', 'one'), vm('b', 'two')] } },
			{ stdout: { vm_id: 'b', data: btoa('from b\n') } },
			{ stdout: { vm_id: 'a', data: btoa('from ') } },
			{ stderr: { vm_id: 'a', data: btoa('warn\n') } },
			{ stdout: { vm_id: 'a', data: btoa('a\n') } },
			{ exit: { vm_id: 'b', code: 3, signal: null, duration_ms: 12 } }
		];
		for (const l of lines) apply(f, l, d);
		expect(f.vms.map((v) => [v.vm_name, v.stdout, v.stderr])).toEqual([
			['one', 'from a\n', 'warn\n'],
			['two', 'from b\n', '']
		]);
		// b ended, a still runs: each says so.
		expect(outcome(f.vms[1])).toEqual(['exit 3', 'failed']);
		expect(outcome(f.vms[0])).toEqual(['running…', 'running']);
		apply(f, { error: { vm_id: 'a', message: 'the agent went away', duration_ms: 20 } }, d);
		apply(f, { done: { succeeded: 0, failed: 2, duration_ms: 21 } }, d);
		expect(outcome(f.vms[0])).toEqual(['the agent went away', 'error']);
		expect(f.done).toEqual({ succeeded: 0, failed: 2, duration_ms: 21 });
	});
	it('ignores a line for a VM it was not told of', () => {
		const f: FanOut = { vms: [], done: null };
		apply(f, { stdout: { vm_id: 'x', data: btoa('?') } }, new Map());
		expect(f.vms).toEqual([]);
	});
});
