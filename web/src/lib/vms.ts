// Loading VMs a page at a time, and every page when a whole view needs them.
import { api, call, type Vm, type VmState } from './api/client';

export type VmQuery = {
	project?: string;
	state?: VmState;
	label?: string;
	name?: string;
	limit?: number;
	cursor?: string;
};

export async function vmPage(q: VmQuery): Promise<{ items: Vm[]; next_cursor?: string | null }> {
	return call(api.GET('/v1/vms', { params: { query: q } }));
}

/** Every VM matching `q`, walking the pages (at most `max`). */
export async function allVms(q: VmQuery = {}, max = 10000): Promise<Vm[]> {
	const out: Vm[] = [];
	let cursor: string | undefined;
	do {
		const p = await vmPage({ ...q, limit: 500, cursor });
		out.push(...p.items);
		cursor = p.next_cursor ?? undefined;
	} while (cursor && out.length < max);
	return out;
}

export const STATES: VmState[] = [
	'pending',
	'provisioning',
	'running',
	'paused',
	'stopping',
	'stopped',
	'rebooting',
	'deleting',
	'error',
	'unknown',
	'deleted'
];
