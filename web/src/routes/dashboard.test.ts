import { cleanup, render, screen } from '@testing-library/svelte';
import { afterEach, describe, expect, it, vi } from 'vitest';

// The dashboard against a stubbed API: what it shows while loading, with
// data, and when the API refuses.
const node = {
	id: 'n1', name: 'node-1', region: 'default', arch: 'x86_64', engines: ['qemu'], unavailable_engines: [], kvm: false,
	status: 'online', capacity: { vcpus: 4, memory_mib: 8192, disk_gib: 100 },
	usage: { vcpus: 1, memory_mib: 1024, disk_gib: 1 }, reserved: { vcpus: 3, memory_mib: 2048, disk_gib: 10 },
	last_heartbeat_at: new Date().toISOString(), created_at: new Date().toISOString()
};

// The API client keeps the fetch it was made with: stub it before the
// client's module is first imported (below, dynamically), answer per test.
let routes: Record<string, [number, unknown]> = {};
vi.stubGlobal(
	'fetch',
	vi.fn(async (input: Request | string) => {
		const url = new URL(typeof input === 'string' ? input : input.url, 'http://localhost');
		const [status, body] = routes[url.pathname] ?? [404, { error: { code: 'not_found', message: 'no route' } }];
		return new Response(JSON.stringify(body), { status, headers: { 'content-type': 'application/json' } });
	})
);

afterEach(cleanup);

function stub(r: Record<string, [number, unknown]>) {
	routes = r;
}

const member = [{ project: 'team-a', project_id: 'p1', role: 'member' as const }];

async function mount(admin: boolean, memberships: typeof member = member) {
	const { session } = await import('$lib/session.svelte');
	session.me = {
		user: { id: 'u1', name: admin ? 'admin' : 'alice', admin, created_at: '' },
		memberships
	};
	session.checked = true;
	const Page = (await import('./+page.svelte')).default;
	return render(Page);
}

describe('dashboard', () => {
	it('shows counts by state and node bars to an admin', async () => {
		stub({
			'/v1/nodes': [200, [node]],
			'/v1/vm-states': [200, [{ state: 'running', count: 3 }, { state: 'paused', count: 1 }]],
			'/v1/audit': [200, { items: [{ id: 'e1', at: new Date().toISOString(), actor: 'alice', action: 'vm_create', status: 202, result: 'ok', target_kind: 'vm', target_id: 'v1' }, { id: 'e2', at: new Date().toISOString(), actor: 'node:n', action: 'node_heartbeat', status: 200, result: 'ok' }] }]
		});
		await mount(true);
		expect((await screen.findByTestId('vm-total')).textContent).toBe('4');
		expect(screen.getByText('node-1')).toBeTruthy();
		expect(screen.getByRole('meter', { name: 'vCPU reserved' }).getAttribute('aria-valuenow')).toBe('75');
		expect(await screen.findByText('vm_create')).toBeTruthy();
		expect(screen.queryByText('node_heartbeat')).toBeNull();
	});

	it("shows the API's own message when it refuses", async () => {
		stub({
			'/v1/vm-states': [503, { error: { code: 'unavailable', message: 'the database is not reachable' } }]
		});
		await mount(false);
		expect(await screen.findByText('the database is not reachable')).toBeTruthy();
		expect(screen.getByText('Nodes are shown to admins.')).toBeTruthy();
	});

	it('says so when there are no VMs', async () => {
		stub({ '/v1/vm-states': [200, []] });
		await mount(false);
		expect(await screen.findByText(/No VMs yet/)).toBeTruthy();
	});

	it('tells a new account in no project whom to ask', async () => {
		stub({ '/v1/vm-states': [200, []] });
		await mount(false, []);
		expect(await screen.findByText(/You are in no project yet/)).toBeTruthy();
		expect(screen.queryByText(/No VMs yet/)).toBeNull();
	});
});
