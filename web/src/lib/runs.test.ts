import { describe, expect, it } from 'vitest';
import { decodeChunk, splitLines } from './runs';

describe('the run stream', () => {
	it('splits complete lines and keeps the rest', () => {
		expect(splitLines('{"a":1}\n{"b":2}\n{"c"')).toEqual([['{"a":1}', '{"b":2}'], '{"c"']);
		expect(splitLines('\n\n')).toEqual([[], '']);
	});
	it('decodes base64 output, a UTF-8 character split across chunks included', () => {
		const d = new TextDecoder();
		const euro = new TextEncoder().encode('€');
		const b64 = (b: Uint8Array) => btoa(String.fromCharCode(...b));
		expect(decodeChunk(b64(euro.slice(0, 1)), d) + decodeChunk(b64(euro.slice(1)), d)).toBe('€');
		expect(decodeChunk(btoa('hi\n'), new TextDecoder())).toBe('hi\n');
	});
});
