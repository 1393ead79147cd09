// `cargo xtask bench web`: the console's built size (JS and CSS, gzip) and
// its time to first render in Chromium (Performance API), against a real
// byteportd (control plane, SQLite) holding 1,000 VMs.
//
// The daemon is BYTEPORTD (target/release/byteportd); the console is
// web/build. Each timed load runs in a fresh browser context (cold cache);
// the figure is the page's own mark (`bp:dashboard-rendered`,
// `bp:vm-list-rendered`, set once its data is on screen), in milliseconds
// after the navigation started.
import { spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { gzipSync } from 'node:zlib';
import { launch } from '../e2e/browser.mjs';

const BIN = process.env.BYTEPORTD ?? resolve('../target/release/byteportd');
const VMS = Number(process.env.BYTEPORT_BENCH_VMS ?? 1000);
const RUNS = Number(process.env.BYTEPORT_BENCH_RUNS ?? 5);

function sizes(dir) {
	const out = { js: 0, css: 0, jsRaw: 0, cssRaw: 0, files: 0 };
	const walk = (d) => {
		for (const f of readdirSync(d)) {
			const p = join(d, f);
			if (statSync(p).isDirectory()) walk(p);
			else if (/\.(m?js|css)$/.test(f)) {
				const b = readFileSync(p);
				const kind = f.endsWith('.css') ? 'css' : 'js';
				out[kind] += gzipSync(b, { level: 9 }).length;
				out[kind + 'Raw'] += b.length;
				out.files++;
			}
		}
	};
	walk(join('build', '_app'));
	return out;
}

const freePort = () =>
	new Promise((ok) => {
		const s = createServer().listen(0, '127.0.0.1', () => {
			const p = s.address().port;
			s.close(() => ok(p));
		});
	});

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const kb = (n) => (n / 1024).toFixed(1);

const dir = mkdtempSync(join(tmpdir(), 'bp-bench-web-'));
const port = await freePort();
const url = `http://127.0.0.1:${port}`;
const daemon = spawn(BIN, ['server', '--listen', `127.0.0.1:${port}`, '--data-dir', dir, '--web-dir', 'build'], {
	stdio: ['ignore', 'pipe', 'pipe']
});
let log = '';
daemon.stdout.on('data', (d) => (log += d));
daemon.stderr.on('data', (d) => (log += d));

async function api(method, path, body, token) {
	const r = await fetch(url + path, {
		method,
		headers: {
			'content-type': 'application/json',
			...(token ? { authorization: `Bearer ${token}` } : {})
		},
		body: body ? JSON.stringify(body) : undefined
	});
	const text = await r.text();
	if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
	return { json: text ? JSON.parse(text) : null, headers: r.headers };
}

let browser;
try {
	const deadline = Date.now() + 30_000;
	while (!/--token (\S+)/.test(log)) {
		if (Date.now() > deadline) throw new Error(`byteportd did not start:\n${log}`);
		await new Promise((r) => setTimeout(r, 50));
	}
	const boot = /--token (\S+)/.exec(log)[1];
	await api('POST', '/v1/bootstrap', { token: boot, name: 'admin', password: 'admin-password' });
	const login = await api('POST', '/v1/auth/login', { name: 'admin', password: 'admin-password' });
	const token = login.json.access_token;
	const cookie = /byteport_session=([^;]+)/.exec(login.headers.get('set-cookie'))[1];

	// A fleet to show: nodes with capacity, and VMs (pending: nothing runs them).
	for (let i = 1; i <= 4; i++) {
		const jt = await api('POST', '/v1/node-join-tokens', {}, token);
		await api('POST', '/v1/nodes/register', {
			join_token: jt.json.token,
			name: `node-${i}`,
			engines: ['qemu'],
			capacity: { vcpus: 32, memory_mib: 131072, disk_gib: 2000 }
		});
	}
	await api('POST', '/v1/images', {
		name: 'tiny', os_family: 'linux', os_version: '1', format: 'initramfs',
		size_bytes: 1048576, sha256: 'ab'.repeat(32)
	}, token);
	await api('PUT', '/v1/projects/default/quota', {
		max_vms: VMS + 10, max_vcpus: VMS * 2, max_memory_mib: VMS * 1024, max_disk_gib: VMS * 20
	}, token);
	const t0 = Date.now();
	for (let i = 0; i < VMS; i += 25) {
		await Promise.all(
			Array.from({ length: Math.min(25, VMS - i) }, (_, j) =>
				api('POST', '/v1/vms', { name: `vm-${i + j}`, image: 'tiny', flavor: 'm1.tiny', labels: { bench: 'web' } }, token)
			)
		);
	}
	console.error(`created ${VMS} VMs in ${((Date.now() - t0) / 1000).toFixed(1)} s`);

	browser = await launch();
	async function measure(path, mark, check) {
		const times = [];
		let js = 0;
		let css = 0;
		for (let i = 0; i < RUNS; i++) {
			const ctx = await browser.newContext({ viewport: { width: 1280, height: 900 } });
			await ctx.addCookies([{ name: 'byteport_session', value: cookie, url }]);
			const page = await ctx.newPage();
			await page.goto(url + path);
			await page.waitForFunction((m) => performance.getEntriesByName(m).length > 0, mark, { timeout: 60_000 });
			const r = await page.evaluate((m) => {
				const t = performance.getEntriesByName(m)[0].startTime;
				const res = performance.getEntriesByType('resource');
				const sum = (re) => res.filter((e) => re.test(e.name)).reduce((n, e) => n + e.encodedBodySize, 0);
				return { t, js: sum(/\.js(\?|$)/), css: sum(/\.css(\?|$)/) };
			}, mark);
			if (check) await check(page);
			times.push(r.t);
			js = r.js;
			css = r.css;
			await ctx.close();
		}
		return { median: median(times), min: Math.min(...times), max: Math.max(...times), js, css };
	}
	const dash = await measure('/', 'bp:dashboard-rendered', async (page) => {
		const total = await page.getByTestId('vm-total').innerText();
		if (Number(total) !== VMS) throw new Error(`the dashboard counts ${total} VMs, not ${VMS}`);
	});
	const list = await measure('/vms?size=all', 'bp:vm-list-rendered', async (page) => {
		const rows = await page.locator('tr[data-vm]').count();
		if (rows !== VMS) throw new Error(`the list shows ${rows} rows, not ${VMS}`);
	});
	const s = sizes('.');
	const cpu = readFileSync('/proc/cpuinfo', 'utf8').match(/model name\s*:\s*(.*)/)?.[1] ?? 'unknown CPU';
	console.log(`\nWeb console (${s.files} JS/CSS files in build/_app; ${cpu}, ${RUNS} cold loads each, median [min-max])\n`);
	console.log('| Figure | Value |');
	console.log('|---|---|');
	console.log(`| Built JS, all routes and xterm.js (gzip / raw) | ${kb(s.js)} KB / ${kb(s.jsRaw)} KB |`);
	console.log(`| Built CSS (gzip / raw) | ${kb(s.css)} KB / ${kb(s.cssRaw)} KB |`);
	console.log(`| JS loaded by the dashboard (gzip, as sent) | ${kb(dash.js)} KB |`);
	console.log(`| CSS loaded by the dashboard (gzip, as sent) | ${kb(dash.css)} KB |`);
	console.log(`| Dashboard rendered (${VMS} VMs, 4 nodes) | ${dash.median.toFixed(0)} ms [${dash.min.toFixed(0)}-${dash.max.toFixed(0)}] |`);
	console.log(`| VM list of ${VMS} rendered | ${list.median.toFixed(0)} ms [${list.min.toFixed(0)}-${list.max.toFixed(0)}] |`);
	console.log(`| JS loaded by the VM list (gzip, as sent) | ${kb(list.js)} KB |`);
	const goals = [
		[dash.js < 150 * 1024, `first page JS ${kb(dash.js)} KB gzip < 150 KB`],
		[dash.median < 300, `dashboard ${dash.median.toFixed(0)} ms < 300 ms`]
	];
	for (const [ok, what] of goals) console.log(`goal ${ok ? 'met' : 'MISSED'}: ${what}`);
} finally {
	await browser?.close();
	daemon.kill('SIGTERM');
	await new Promise((r) => daemon.once('exit', r));
	rmSync(dir, { recursive: true, force: true });
}
