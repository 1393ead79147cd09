// Fails when src/lib/api/schema.d.ts is not what openapi-typescript makes
// from ../openapi/byteport.json (run `npm run gen` and commit the result).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

const dir = mkdtempSync(join(tmpdir(), 'bp-gen-'));
const out = join(dir, 'schema.d.ts');
try {
	execFileSync(
		process.execPath,
		['node_modules/openapi-typescript/bin/cli.js', '../openapi/byteport.json', '-o', out],
		{ stdio: ['ignore', 'ignore', 'inherit'] }
	);
	const fresh = readFileSync(out, 'utf8');
	const committed = readFileSync('src/lib/api/schema.d.ts', 'utf8');
	if (fresh !== committed) {
		console.error(
			'src/lib/api/schema.d.ts is stale: it does not match openapi/byteport.json.\n' +
				'Run `npm run gen` in web/ and commit the result.'
		);
		process.exit(1);
	}
	console.log('generated API types are up to date');
} finally {
	rmSync(dir, { recursive: true, force: true });
}
