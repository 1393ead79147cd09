// Reading the NDJSON stream of POST /v1/runs as it comes.
import type { components } from './api/schema';

export type Run = components['schemas']['Run'];
export type RunLine = components['schemas']['RunLine'];

/** Bytes of base64, as text (invalid UTF-8 replaced). */
export function decodeChunk(b64: string, decoder: TextDecoder): string {
	const bin = atob(b64);
	const bytes = new Uint8Array(bin.length);
	for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
	return decoder.decode(bytes, { stream: true });
}

/** Splits a growing buffer into complete lines and the rest. */
export function splitLines(buf: string): [string[], string] {
	const parts = buf.split('\n');
	const rest = parts.pop() ?? '';
	return [parts.filter((l) => l.trim() !== ''), rest];
}

/**
 * POSTs `body` as JSON to an endpoint that answers NDJSON; `onLine` sees
 * each line as it arrives. A refusal throws with the server's message.
 */
export async function postLines<T>(path: string, body: unknown, onLine: (l: T) => void): Promise<void> {
	const res = await fetch(path, {
		method: 'POST',
		credentials: 'same-origin',
		headers: { 'content-type': 'application/json', accept: 'application/x-ndjson' },
		body: JSON.stringify(body)
	});
	if (!res.ok || !res.body) {
		const e = await res.json().catch(() => null);
		throw new Error(e?.error?.message ?? `the request was refused (HTTP ${res.status})`);
	}
	const reader = res.body.getReader();
	const dec = new TextDecoder();
	let buf = '';
	for (;;) {
		const { done, value } = await reader.read();
		if (done) break;
		buf += dec.decode(value, { stream: true });
		const [lines, rest] = splitLines(buf);
		buf = rest;
		for (const l of lines) onLine(JSON.parse(l) as T);
	}
}

/** Runs a program; `onLine` sees each line as it arrives. */
export function startRun(body: Record<string, unknown>, onLine: (l: RunLine) => void): Promise<void> {
	return postLines<RunLine>('/v1/runs', body, onLine);
}
