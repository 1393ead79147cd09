import { describe, expect, it } from 'vitest';
import { dispatch, subscribe } from './events.svelte';

describe('event feed', () => {
	it('routes VM and node events to listeners, and stops after unsubscribe', () => {
		const vms: string[] = [];
		const nodes: string[] = [];
		const off = subscribe({ vm: (v) => vms.push(v.id), node: (n) => nodes.push(n.name) });
		dispatch(JSON.stringify({ vm: { id: 'v1' } }));
		dispatch(JSON.stringify({ node: { name: 'n1' } }));
		dispatch('not json');
		off();
		dispatch(JSON.stringify({ vm: { id: 'v2' } }));
		expect(vms).toEqual(['v1']);
		expect(nodes).toEqual(['n1']);
	});
});
