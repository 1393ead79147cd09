import { describe, expect, it } from 'vitest';
import { ApiError, call, messageOf } from './client';

describe('API errors', () => {
	it("carry the API's own message and code", async () => {
		const response = new Response('', { status: 409 });
		const body = { error: { code: 'conflict', message: 'cannot pause a VM that is stopped: it is not running' } };
		await expect(call(Promise.resolve({ error: body, response }))).rejects.toEqual(
			new ApiError('cannot pause a VM that is stopped: it is not running', 409, 'conflict')
		);
	});
	it('fall back to the status', () => {
		expect(messageOf(undefined, 502)).toBe('the server answered 502');
	});
	it('say when the server is unreachable', async () => {
		await expect(call(Promise.reject(new TypeError('fetch failed')))).rejects.toThrow(
			'the server cannot be reached'
		);
	});
	it('pass data through', async () => {
		const response = new Response('', { status: 200 });
		await expect(call(Promise.resolve({ data: { ok: 1 }, response }))).resolves.toEqual({ ok: 1 });
	});
});
