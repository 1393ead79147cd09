// A command run on every VM of an environment, read from the NDJSON of
// POST /v1/environments/{env}/exec as it comes.
import type { components } from './api/schema';
import { decodeChunk } from './runs';

export type EnvExecEvent = components['schemas']['EnvironmentExecEvent'];

/** Output kept per VM and stream, as the server's gathered run keeps. */
export const KEEP = 1 << 20;

/** One VM's part of the run so far. */
export interface VmPart {
	vm_id: string;
	vm_name: string;
	image: string;
	arch: string;
	stdout: string;
	stderr: string;
	truncated: boolean;
	/** How it ended, once it has: an exit code, a signal or an error. */
	end: { code?: number | null; signal?: number | null; error?: string } | null;
	duration_ms: number | null;
}

export interface FanOut {
	vms: VmPart[];
	done: { succeeded: number; failed: number; duration_ms: number } | null;
}

/** Applies one line of the stream to `f` (in place, so a `$state` proxy updates). */
export function apply(f: FanOut, ev: EnvExecEvent, decoders: Map<string, TextDecoder>): void {
	const part = (id: string) => f.vms.find((v) => v.vm_id === id);
	const add = (id: string, key: 'stdout' | 'stderr', data: string) => {
		const p = part(id);
		if (!p) return;
		const k = `${id}:${key}`;
		let d = decoders.get(k);
		if (!d) decoders.set(k, (d = new TextDecoder()));
		const text = decodeChunk(data, d);
		const room = KEEP - p[key].length;
		if (text.length > room) p.truncated = true;
		p[key] += text.slice(0, Math.max(0, room));
	};
	if ('started' in ev) {
		f.vms = ev.started.vms.map((v) => ({
			...v,
			stdout: '',
			stderr: '',
			truncated: false,
			end: null,
			duration_ms: null
		}));
	} else if ('stdout' in ev) {
		add(ev.stdout.vm_id, 'stdout', ev.stdout.data);
	} else if ('stderr' in ev) {
		add(ev.stderr.vm_id, 'stderr', ev.stderr.data);
	} else if ('exit' in ev) {
		const p = part(ev.exit.vm_id);
		if (p) {
			p.end = { code: ev.exit.code, signal: ev.exit.signal };
			p.duration_ms = ev.exit.duration_ms;
		}
	} else if ('error' in ev) {
		const p = part(ev.error.vm_id);
		if (p) {
			p.end = { error: ev.error.message };
			p.duration_ms = ev.error.duration_ms;
		}
	} else if ('done' in ev) {
		f.done = ev.done;
	}
}

/** How a VM's part ended, in words, and whether that is a success. */
export function outcome(p: VmPart): [string, 'ok' | 'failed' | 'error' | 'running'] {
	if (!p.end) return ['running…', 'running'];
	if (p.end.error) return [p.end.error, 'error'];
	if (p.end.code === 0) return ['exit 0', 'ok'];
	if (p.end.code !== null && p.end.code !== undefined) return [`exit ${p.end.code}`, 'failed'];
	return [`signal ${p.end.signal}`, 'failed'];
}
