import { describe, expect, it } from 'vitest';
import { labelsError, nameError, prefixesError, sizeError, sshKeyError, userDataError } from './validate';

// The messages are the API's own (crates/byteport-types/src/name.rs,
// crates/byteport-server/src/app/{vms,catalog}.rs).
describe('create-VM validation', () => {
	it('names', () => {
		expect(nameError('web-1')).toBeNull();
		expect(nameError('')).toBe('name is empty');
		expect(nameError('x'.repeat(64))).toBe('name is 64 characters long; at most 63 are allowed');
		expect(nameError('Web')).toBe("name contains 'W'; only a-z, 0-9, '-' and '.' are allowed");
		expect(nameError('a;rm -rf')).toBe("name contains ';'; only a-z, 0-9, '-' and '.' are allowed");
		expect(nameError('-a')).toBe('name must start and end with a letter or a digit');
		expect(nameError('a..b')).toBe("name must not contain '..'");
	});
	it('sizes', () => {
		expect(sizeError(1, 512, 1)).toBeNull();
		expect(sizeError(0, 512, 1)).toBe('vcpus is 0; it must be between 1 and 256');
		expect(sizeError(1, 32, 1)).toBe('memory_mib is 32; it must be between 64 and 4194304');
		expect(sizeError(1, 512, 0)).toBe('disk_gib is 0; it must be between 1 and 65536');
	});
	it('ssh keys', () => {
		expect(sshKeyError(['ssh-ed25519 AAAAC3 me@host'])).toBeNull();
		expect(sshKeyError(['hello'])).toBe(
			'ssh_keys[0] is not one OpenSSH public key line ("ssh-ed25519 AAAA... comment")'
		);
	});
	it('user-data', () => {
		expect(userDataError('#cloud-config\nruncmd: []\n')).toBeNull();
		expect(userDataError('a\u0001b')).toBe(
			'user_data must be text (cloud-config, a script or multipart); it contains the control character U+0001'
		);
		expect(userDataError('x'.repeat(64 * 1024 + 1))).toBe('user_data is 65537 bytes; at most 65536 are allowed');
	});
	it('labels', () => {
		expect(labelsError({ env: 'dev' })).toBeNull();
		expect(labelsError({ 'bad key': 'x' })).toBe(
			`label key "bad key" must be 1-63 characters of letters, digits, '.', '-', '_' and '/'`
		);
	});
});

describe('environment validation', () => {
	it('prefixes', () => {
		expect(prefixesError('debian, alpine')).toBeNull();
		expect(prefixesError(' , ')).toBe('give at least one prefix, such as debian');
		expect(prefixesError('Debian')).toBe('"Debian" must be lowercase letters, digits, "-" or "."');
		expect(prefixesError('a b')).toBe('"a b" must be lowercase letters, digits, "-" or "."');
	});
});
