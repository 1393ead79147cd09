// Writes src/lib/api/limits.ts: the limits the API enforces, read from the
// OpenAPI document (../openapi/byteport.json), so the console's own checks
// never repeat a number. `--check` fails instead when the file is stale.
import { readFileSync, writeFileSync } from 'node:fs';

const doc = JSON.parse(readFileSync('../openapi/byteport.json', 'utf8'));
const schemas = doc.components.schemas;

/** The numeric and length rules of one property of a component schema. */
function rules(schema, prop) {
	const p = schemas[schema]?.properties?.[prop];
	if (!p) throw new Error(`the document has no ${schema}.${prop}`);
	const out = {};
	for (const k of ['minimum', 'maximum', 'minLength', 'maxLength', 'minItems', 'maxItems']) {
		if (p[k] !== undefined) out[k] = p[k];
	}
	return out;
}

const limits = {
	name: {
		minLength: schemas.Name.minLength,
		maxLength: schemas.Name.maxLength,
		pattern: schemas.Name.pattern
	},
	vcpus: rules('VmCreate', 'vcpus'),
	memory_mib: rules('VmCreate', 'memory_mib'),
	disk_gib: rules('VmCreate', 'disk_gib'),
	password: rules('UserCreate', 'password'),
	token_days: rules('TokenCreate', 'expires_in_days'),
	lifetime_secs: rules('EnvironmentCreate', 'lifetime_secs'),
	quota: Object.fromEntries(
		Object.keys(schemas.Quota.properties).map((k) => [k, rules('Quota', k)])
	)
};

const text =
	'// Generated from openapi/byteport.json by scripts/gen-limits.mjs (`npm run gen`):\n' +
	'// the limits the API enforces. Do not edit.\n\n' +
	`export const limits = ${JSON.stringify(limits, null, '\t')} as const;\n`;

const path = 'src/lib/api/limits.ts';
if (process.argv.includes('--check')) {
	if (readFileSync(path, 'utf8') !== text) {
		console.error(`${path} is stale: run \`npm run gen\` in web/ and commit the result.`);
		process.exit(1);
	}
	console.log('generated API limits are up to date');
} else {
	writeFileSync(path, text);
}
