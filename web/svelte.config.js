import adapter from '@sveltejs/adapter-static';
import { vitePreprocess } from '@sveltejs/vite-plugin-svelte';

/** @type {import('@sveltejs/kit').Config} */
const config = {
	preprocess: vitePreprocess(),
	kit: {
		// A single-page app: byteportd serves index.html for every console route.
		adapter: adapter({ fallback: 'index.html', precompress: true, strict: true }),
		version: { pollInterval: 0 },
		// One script and one stylesheet: no waterfall of chunks before the first render.
		output: { bundleStrategy: 'single' }
	}
};

export default config;
