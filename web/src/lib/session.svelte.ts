// Who is logged in (from /v1/auth/whoami), and what they may do where.
import { api, call, type Role, type Whoami } from './api/client';
import { takeSession } from './prefetch';

export const session = $state<{ me: Whoami | null; checked: boolean; notice: string }>({
	me: null,
	checked: false,
	notice: ''
});

/** Asks the server who the cookie belongs to; `null` when nobody. */
export async function loadSession(): Promise<Whoami | null> {
	try {
		const early = await takeSession();
		if (early !== undefined && early !== null) {
			session.me = early.whoami ?? null;
			session.checked = true;
			return session.me;
		}
		const r = await api.GET('/v1/auth/session');
		// Only the server's own "nobody" logs the browser out; a failed
		// request (a restart, a busy database) keeps what was known.
		if (r.response.ok) session.me = r.data?.whoami ?? null;
		else if (!session.checked) session.me = null;
	} catch {
		if (!session.checked) session.me = null;
	}
	session.checked = true;
	return session.me;
}

export function isAdmin(): boolean {
	return session.me?.user.admin === true;
}

const rank: Record<Role, number> = { viewer: 0, member: 1, owner: 2 };

/** The caller's role in a project (admins act as owners). */
export function roleIn(projectId: string): Role | null {
	if (isAdmin()) return 'owner';
	return session.me?.memberships.find((m) => m.project_id === projectId)?.role ?? null;
}

/** Whether the caller has at least `need` in the project. */
export function can(projectId: string, need: Role): boolean {
	const r = roleIn(projectId);
	return r !== null && rank[r] >= rank[need];
}

export async function logout(): Promise<void> {
	await call(api.POST('/v1/auth/logout', {})).catch(() => undefined);
	session.me = null;
}
