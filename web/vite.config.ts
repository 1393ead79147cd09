import { sveltekit } from '@sveltejs/kit/vite';
import tailwindcss from '@tailwindcss/vite';
import { defineConfig } from 'vitest/config';

// `npm run dev` proxies the API to a byteportd on BYTEPORT_URL.
const api = process.env.BYTEPORT_URL ?? 'http://127.0.0.1:7480';

export default defineConfig({
	plugins: [tailwindcss(), sveltekit()],
	server: {
		proxy: {
			'/v1': { target: api, ws: true, changeOrigin: false }
		}
	},
	test: {
		include: ['src/**/*.test.ts'],
		environment: 'jsdom'
	},
	resolve: process.env.VITEST ? { conditions: ['browser'] } : undefined
});
