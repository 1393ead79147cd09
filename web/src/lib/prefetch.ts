// Answers that index.html asked for before the application loaded (see
// src/app.html). Each is taken once; later reads go to the API.
import type { Node, Schemas } from './api/client';

type Prefetch = {
	session?: Promise<Schemas['SessionState'] | null>;
	dashboard?: Promise<[Node[] | null, Schemas['VmStateCount'][] | null] | null>;
};

function take<K extends keyof Prefetch>(k: K): Prefetch[K] | undefined {
	const w = globalThis as { __bpPrefetch?: Prefetch };
	const v = w.__bpPrefetch?.[k];
	if (w.__bpPrefetch) delete w.__bpPrefetch[k];
	return v;
}

export const takeSession = () => take('session');
export const takeDashboard = () => take('dashboard');
