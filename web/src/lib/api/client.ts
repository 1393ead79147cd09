// The API client: typed from the generated schema (src/lib/api/schema.d.ts,
// made from openapi/byteport.json by `npm run gen`). The browser session is
// the HTTP-only cookie that /v1/auth/login sets; nothing is kept in storage.
import createClient, { type Middleware } from 'openapi-fetch';
import type { components, paths } from './schema';

export type Schemas = components['schemas'];
export type Vm = Schemas['Vm'];
export type VmState = Schemas['VmState'];
export type VmAction = Schemas['VmAction'];
export type Node = Schemas['Node'];
export type Image = Schemas['Image'];
export type Flavor = Schemas['Flavor'];
export type Project = Schemas['Project'];
export type Member = Schemas['Member'];
export type User = Schemas['User'];
export type ApiToken = Schemas['ApiToken'];
export type AuditEvent = Schemas['AuditEvent'];
export type Whoami = Schemas['Whoami'];
export type Invite = Schemas['Invite'];
export type InviteCreated = Schemas['InviteCreated'];
export type SignupInfo = Schemas['SignupInfo'];
export type Role = Schemas['Role'];
export type Event = Schemas['Event'];
export type Environment = Schemas['Environment'];
export type VmStatsView = Schemas['VmStatsView'];

/** An API error, carrying the server's own message. */
export class ApiError extends Error {
	constructor(
		message: string,
		public status: number,
		public code: string
	) {
		super(message);
	}
}

let expired: (() => void) | null = null;

/** Called when a request is refused for want of a (still valid) session. */
export function onSessionExpired(f: () => void) {
	expired = f;
}

const sessionWatch: Middleware = {
	onResponse({ request, response }) {
		const path = new URL(request.url, 'http://x').pathname;
		if (response.status === 401 && !path.startsWith('/v1/auth/')) expired?.();
		return undefined;
	}
};

export const api = createClient<paths>({
	baseUrl: typeof location === 'undefined' ? 'http://localhost' : location.origin,
	credentials: 'same-origin'
});
api.use(sessionWatch);

/** The message of an error body, or a fallback naming the status. */
export function messageOf(body: unknown, status: number): string {
	const e = (body as { error?: { message?: unknown } } | undefined)?.error;
	if (e && typeof e.message === 'string' && e.message) return e.message;
	return `the server answered ${status}`;
}

/**
 * Unwraps an openapi-fetch result: the data, or an ApiError with the API's
 * own message.
 */
export async function call<T>(
	p: Promise<{ data?: T; error?: unknown; response: Response }>
): Promise<T> {
	let r;
	try {
		r = await p;
	} catch {
		throw new ApiError('the server cannot be reached; is byteportd running?', 0, 'network');
	}
	if (r.error !== undefined || !r.response.ok) {
		const code =
			(r.error as { error?: { code?: string } } | undefined)?.error?.code ?? 'http_' + r.response.status;
		throw new ApiError(messageOf(r.error, r.response.status), r.response.status, code);
	}
	return r.data as T;
}

/** A message for anything thrown. */
export function errorText(e: unknown): string {
	if (e instanceof Error) return e.message;
	return String(e);
}
