// Generated from openapi/byteport.json by scripts/gen-limits.mjs (`npm run gen`):
// the limits the API enforces. Do not edit.

export const limits = {
	"name": {
		"minLength": 1,
		"maxLength": 63,
		"pattern": "^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$"
	},
	"vcpus": {
		"minimum": 1,
		"maximum": 256
	},
	"memory_mib": {
		"minimum": 64,
		"maximum": 4194304
	},
	"disk_gib": {
		"minimum": 1,
		"maximum": 65536
	},
	"password": {
		"minLength": 8,
		"maxLength": 256
	},
	"token_days": {
		"minimum": 1,
		"maximum": 3650
	},
	"lifetime_secs": {
		"minimum": 60,
		"maximum": 2592000
	},
	"quota": {
		"max_concurrent_runs": {
			"minimum": 0,
			"maximum": 10000
		},
		"max_disk_gib": {
			"minimum": 0,
			"maximum": 1073741824
		},
		"max_memory_mib": {
			"minimum": 0,
			"maximum": 1099511627776
		},
		"max_vcpus": {
			"minimum": 0,
			"maximum": 1000000
		},
		"max_vms": {
			"minimum": 0,
			"maximum": 100000
		}
	}
} as const;
