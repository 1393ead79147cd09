// Debian's Chromium driven by playwright-core (Playwright's own browser
// download is not used). Each launch gets a fresh profile directory.
import { chromium } from 'playwright-core';
import { existsSync } from 'node:fs';

export const CHROMIUM = process.env.BYTEPORT_CHROMIUM ?? '/usr/bin/chromium';

export async function launch() {
	if (!existsSync(CHROMIUM)) {
		throw new Error(`no Chromium at ${CHROMIUM} (apt-get install chromium, or set BYTEPORT_CHROMIUM)`);
	}
	return chromium.launch({
		executablePath: CHROMIUM,
		headless: true,
		args: [
			'--headless',
			'--no-sandbox',
			'--disable-gpu',
			'--disable-background-networking',
			'--disable-component-update',
			'--no-first-run'
		]
	});
}

/** Records browser console errors and page errors of every page of a context. */
export function watchErrors(context, sink) {
	const watch = (page) => {
		page.on('console', (m) => {
			if (m.type() === 'error') sink.push(`${page.url()}: console error: ${m.text()}`);
		});
		page.on('pageerror', (e) => sink.push(`${page.url()}: page error: ${e.message}`));
	};
	context.on('page', watch);
	for (const p of context.pages()) watch(p);
}
