// Checks forms before they are sent, with the API's own words and the
// limits its OpenAPI document states (src/lib/api/limits.ts, generated). The
// API checks again; its message is shown when it refuses.

import { limits } from './api/limits';

export const MAX_VCPUS = limits.vcpus.maximum;
export const MIN_MEMORY_MIB = limits.memory_mib.minimum;
export const MAX_MEMORY_MIB = limits.memory_mib.maximum;
export const MAX_DISK_GIB = limits.disk_gib.maximum;
export const MIN_PASSWORD = limits.password.minLength;
export const MAX_TOKEN_DAYS = limits.token_days.maximum;
/** Bytes (the document can only say characters). */
export const MAX_USER_DATA = 64 * 1024;

/** The name rule: 1-63 of a-z, 0-9, '-', '.', letters or digits at both ends. */
export function nameError(s: string): string | null {
	if (s.length === 0) return 'name is empty';
	const len = [...s].length;
	if (len > limits.name.maxLength)
		return `name is ${len} characters long; at most ${limits.name.maxLength} are allowed`;
	const bad = [...s].find((c) => !/[a-z0-9.-]/.test(c));
	if (bad !== undefined) return `name contains '${bad}'; only a-z, 0-9, '-' and '.' are allowed`;
	const edge = (c: string | undefined) => c !== undefined && /[a-z0-9]/.test(c);
	if (!edge(s[0]) || !edge(s[s.length - 1]))
		return 'name must start and end with a letter or a digit';
	if (s.includes('..')) return "name must not contain '..'";
	return null;
}

export function sizeError(vcpus: number, memoryMib: number, diskGib: number): string | null {
	if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS)
		return `vcpus is ${vcpus}; it must be between 1 and ${MAX_VCPUS}`;
	if (!Number.isInteger(memoryMib) || memoryMib < MIN_MEMORY_MIB || memoryMib > MAX_MEMORY_MIB)
		return `memory_mib is ${memoryMib}; it must be between ${MIN_MEMORY_MIB} and ${MAX_MEMORY_MIB}`;
	if (!Number.isInteger(diskGib) || diskGib < 1 || diskGib > MAX_DISK_GIB)
		return `disk_gib is ${diskGib}; it must be between 1 and ${MAX_DISK_GIB}`;
	return null;
}

export function sshKeyError(keys: string[]): string | null {
	if (keys.length > 32) return `${keys.length} SSH keys given; at most 32 are allowed`;
	for (let i = 0; i < keys.length; i++) {
		const kind = keys[i].trim().split(/\s+/)[0] ?? '';
		const known = kind.startsWith('ssh-') || kind.startsWith('ecdsa-') || kind.startsWith('sk-');
		// eslint-disable-next-line no-control-regex
		if (!known || keys[i].length > 8192 || /[\u0000-\u001f\u007f]/.test(keys[i]))
			return `ssh_keys[${i}] is not one OpenSSH public key line ("ssh-ed25519 AAAA... comment")`;
	}
	return null;
}

export function userDataError(d: string): string | null {
	const n = new TextEncoder().encode(d).length;
	if (n > MAX_USER_DATA) return `user_data is ${n} bytes; at most ${MAX_USER_DATA} are allowed`;
	// eslint-disable-next-line no-control-regex
	const m = /[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f]/.exec(d);
	if (m)
		return `user_data must be text (cloud-config, a script or multipart); it contains the control character U+${m[0]
			.charCodeAt(0)
			.toString(16)
			.toUpperCase()
			.padStart(4, '0')}`;
	return null;
}

export function labelsError(labels: Record<string, string>): string | null {
	const keys = Object.keys(labels);
	if (keys.length > 32) return `${keys.length} labels given; at most 32 are allowed`;
	for (const k of keys) {
		if (!/^[A-Za-z0-9._/-]{1,63}$/.test(k))
			return `label key "${k}" must be 1-63 characters of letters, digits, '.', '-', '_' and '/'`;
		// eslint-disable-next-line no-control-regex
		if (labels[k].length > 255 || /[\u0000-\u001f\u007f]/.test(labels[k]))
			return `label "${k}" has a value longer than 255 bytes or with control characters`;
	}
	return null;
}

/** Why a comma-separated list of image-name prefixes is not acceptable, or null. */
export function prefixesError(text: string): string | null {
	const ps = text.split(',').map((p) => p.trim()).filter(Boolean);
	if (ps.length === 0) return 'give at least one prefix, such as debian';
	if (ps.length > 16) return 'at most 16 prefixes';
	const bad = ps.find((p) => !/^[a-z0-9.-]{1,63}$/.test(p));
	if (bad) return `"${bad}" must be lowercase letters, digits, "-" or "."`;
	return null;
}
