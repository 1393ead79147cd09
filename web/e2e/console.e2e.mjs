// End-to-end test of the web console in a real Chromium against a real
// byteportd (all-in-one) with a real `tiny` guest. The Rust test
// crates/byteportd/tests/web_e2e.rs starts the daemon, imports `tiny`,
// makes the users and projects below, and runs this with:
//   BYTEPORT_URL      the daemon's URL
//   BYTEPORT_E2E_B_VM id of a VM in project team-b, which alice and vera must never see
// Users: alice (member of team-a), vera (viewer of team-a); password
// "user-password"; admin with "admin-password".
// Screenshots go to web/test-results/screenshots (or BYTEPORT_SCREENSHOTS).
import { mkdirSync } from 'node:fs';
import { resolve } from 'node:path';
import { launch, watchErrors } from './browser.mjs';

const URL = process.env.BYTEPORT_URL ?? fail('BYTEPORT_URL is not set');
const B_VM = process.env.BYTEPORT_E2E_B_VM ?? fail('BYTEPORT_E2E_B_VM is not set');
const SHOTS = resolve(process.env.BYTEPORT_SCREENSHOTS ?? 'test-results/screenshots');
const PASSWORD = 'user-password';
const BOOT = 240_000;
const DESKTOP = { width: 1280, height: 900 };
const PHONE = { width: 390, height: 844 };

function fail(msg) {
	throw new Error(msg);
}
function step(msg) {
	console.log(`-- ${msg}`);
}
function check(cond, msg) {
	if (!cond) fail(msg);
}

mkdirSync(SHOTS, { recursive: true });
const errors = [];
const browser = await launch();

async function session(user, viewport, password = PASSWORD) {
	const context = await browser.newContext({ viewport, baseURL: URL });
	watchErrors(context, errors);
	const page = await context.newPage();
	page.on('dialog', (d) => d.accept());
	await page.goto('/');
	await page.waitForURL('**/login');
	await page.getByLabel('User name').fill(user);
	await page.getByLabel('Password').fill(password);
	await page.getByRole('button', { name: 'Log in' }).click();
	await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
	await page.getByTestId('whoami').filter({ hasText: user }).first().waitFor({ state: 'attached' });
	return { context, page };
}

async function state(page, s, timeout = BOOT) {
	await page.locator(`[data-testid=vm-state] [data-state=${s}]`).waitFor({ timeout });
}

/**
 * Runs `f`, which provokes a refusal by the API on purpose. Chromium logs
 * every refused request as "Failed to load resource: ... status of N":
 * those (and only those) are expected here; anything else still fails.
 */
async function expectRefusal(status, f) {
	const before = errors.length;
	await f();
	const seen = errors.splice(before);
	check(
		seen.every((e) => e.includes(`Failed to load resource: the server responded with a status of ${status}`)),
		`unexpected browser errors:\n${seen.join('\n')}`
	);
}

async function shot(page, name) {
	await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage: true });
	// Nothing may stick out sideways (a phone would scroll the whole page).
	const [scroll, width] = await page.evaluate(() => [
		document.documentElement.scrollWidth,
		window.innerWidth
	]);
	check(scroll <= width, `${name}: the page is ${scroll} px wide in a ${width} px window`);
}

let ok = false;
let vmId;
let dump = async () => {};
try {
	step('alice logs in; the dashboard shows VMs by state');
	const { context, page } = await session('alice', DESKTOP);
	await page.getByRole('heading', { name: 'VMs by state' }).waitFor();
	await shot(page, 'dashboard-desktop');

	step('the create form refuses a bad name with the API\'s words');
	await page.getByRole('link', { name: 'VMs', exact: true }).click();
	await page.getByRole('link', { name: 'Create VM' }).click();
	await page.getByLabel('Name').fill('Web E2E');
	await page.getByLabel('Project').selectOption('team-a');
	await page.getByRole('button', { name: 'Create VM' }).click();
	await page.getByText("name contains 'W'; only a-z, 0-9, '-' and '.' are allowed").waitFor();
	await shot(page, 'create-form-desktop');

	step('a VM created from the form reaches running without a reload');
	await page.getByLabel('Name').fill('web-e2e');
	await page.getByLabel('Image').selectOption('tiny');
	await page.getByLabel('Flavor').selectOption('');
	await page.getByLabel('vCPUs').fill('1');
	await page.getByLabel('Memory (MiB)').fill('256');
	await page.getByLabel('Disk (GiB)').fill('1');
	await page.getByLabel('Labels (key=value, one per line)').fill('suite=e2e');
	await page.getByRole('button', { name: 'Create VM' }).click();
	await page.waitForURL(/\/vms\/[0-9a-f-]{36}$/);
	vmId = page.url().split('/').pop();
	dump = async () => {
		const r = await context.request.get(`/v1/vms/${vmId}`).catch((e) => e);
		console.error(`the VM now: ${r.status?.()} ${await r.text?.()}`);
		for (const p of context.pages()) {
			const nav = await p.locator('nav').innerText().catch(() => '');
			const badge = await p.getByTestId('vm-state').innerText().catch(() => '');
			console.error(`page ${p.url()}: state badge "${badge}", nav: ${nav.replace(/\s+/g, ' ')}`);
		}
	};
	// A marker that a reload would wipe.
	await page.evaluate(() => (window.__noReload = true));
	await state(page, 'running');
	check(await page.evaluate(() => window.__noReload === true), 'the page reloaded');

	step('the VM page shows its network, address and port maps');
	const net = await page.getByTestId('network').innerText();
	check(/user\s+10\.0\.2\.15/.test(net), `network: ${net}`);
	await page.getByRole('heading', { name: 'Port maps' }).waitFor();
	check((await page.locator('td', { hasText: /^22$/ }).count()) === 1, 'port 22 is mapped');

	step('the VM page shows the figures its node measured');
	await page.getByTestId('vm-figures').waitFor({ timeout: 30_000 });
	const memText = await page.getByTestId('vm-memory').innerText();
	check(/^\d+(\.\d+)? (MiB|GiB)$/.test(memText.trim()), `memory figure: ${memText}`);

	step('the console shows the boot, and typing reaches the guest');
	await page.getByRole('button', { name: 'Open console' }).click();
	const term = page.getByTestId('console');
	await term.filter({ hasText: 'byteport-tiny: init done' }).waitFor({ timeout: 30_000 });
	await page.getByTestId('console-status').filter({ hasText: 'live' }).waitFor();
	await term.click();
	await page.keyboard.type('echo ws-$((40+2))\n');
	await term.filter({ hasText: 'ws-42' }).waitFor({ timeout: 30_000 });
	await shot(page, 'vm-detail-desktop');

	step('pause and resume from the buttons; a forbidden action is disabled with a reason');
	const start = page.locator('button[data-action=start]');
	check(await start.isDisabled(), 'start is enabled on a running VM');
	await page.getByText('Start: cannot start a VM that is running: it is already running').waitFor();
	await page.locator('button[data-action=pause]').click();
	await state(page, 'paused', 60_000);
	check(await page.locator('button[data-action=pause]').isDisabled(), 'pause is enabled on a paused VM');
	await page.locator('button[data-action=resume]').click();
	await state(page, 'running', 60_000);

	step('a refusal by the API is shown in its own words');
	await page.goto('/vms/new');
	await page.getByLabel('Name').fill('web-e2e');
	await page.getByLabel('Project').selectOption('team-a');
	await expectRefusal(409, async () => {
		await page.getByRole('button', { name: 'Create VM' }).click();
		await page.getByRole('alert').filter({ hasText: 'a VM named web-e2e already exists in project' }).waitFor();
	});
	check(page.url().endsWith('/vms/new'), 'the form left after a refusal');

	step('the VM list shows it with its badge, and never team-b\'s VM');
	await page.goto('/vms');
	const row = page.locator('tr[data-vm="web-e2e"]');
	await row.waitFor();
	await row.locator('[data-state=running]').waitFor();
	check((await page.locator(`a[href="/vms/${B_VM}"]`).count()) === 0, 'alice sees team-b\'s VM');
	await page.getByLabel('Search this page').fill('nothing-matches-this');
	await page.getByText('No VM matches these filters.').waitFor();
	await page.getByLabel('Search this page').fill('web-e2e');
	await shot(page, 'vm-list-desktop');
	const direct = await context.request.get(`/v1/vms/${B_VM}`);
	check(direct.status() === 404, `alice reading team-b's VM got ${direct.status()}, not 404`);

	step('phone width: dashboard, list, detail with console, create form');
	const phone = await session('alice', PHONE);
	await shot(phone.page, 'dashboard-phone');
	await phone.page.goto('/vms');
	await phone.page.locator('tr[data-vm="web-e2e"]').waitFor();
	await shot(phone.page, 'vm-list-phone');
	await phone.page.goto(`/vms/${vmId}`);
	await state(phone.page, 'running');
	await phone.page.getByRole('button', { name: 'Open console' }).click();
	await phone.page.getByTestId('console-status').filter({ hasText: 'live' }).waitFor();
	await shot(phone.page, 'vm-detail-phone');
	await phone.page.goto('/vms/new');
	await phone.page.getByLabel('Name').waitFor();
	await shot(phone.page, 'create-form-phone');
	// The menu opens from the keyboard.
	await phone.page.getByRole('button', { name: 'Menu' }).focus();
	await phone.page.keyboard.press('Enter');
	await phone.page.getByRole('link', { name: 'Projects' }).waitFor();
	await phone.context.close();

	step('the admin\'s dashboard shows the node with its capacity bars, and cordon works');
	const admin = await session('admin', DESKTOP, 'admin-password');
	await admin.page.getByTestId('node-card').first().waitFor();
	await admin.page.getByRole('meter', { name: 'Memory reserved' }).first().waitFor();
	await shot(admin.page, 'dashboard-admin-desktop');
	await admin.page.getByRole('link', { name: 'Nodes' }).click();
	await admin.page.getByRole('button', { name: 'Cordon' }).click();
	await admin.page.getByRole('button', { name: 'Uncordon' }).click();
	await admin.page.getByRole('button', { name: 'Cordon' }).waitFor();

	step('an invite link from the Users page makes one account in its project');
	await admin.page.getByRole('link', { name: 'Users' }).click();
	await admin.page.getByLabel('Project', { exact: true }).selectOption('team-a');
	await admin.page.getByLabel('Role').selectOption('viewer');
	await admin.page.getByRole('button', { name: 'Make invite link' }).click();
	const link = (await admin.page.getByTestId('invite-link').textContent()).trim();
	check(link.startsWith(`${URL}/register?invite=bpi_`), `invite link: ${link}`);
	await shot(admin.page, 'users-invite');
	const guest = await browser.newContext({ viewport: DESKTOP, baseURL: URL });
	watchErrors(guest, errors);
	const reg = await guest.newPage();
	await reg.goto(link);
	await reg.getByTestId('invite-offer').filter({ hasText: 'team-a' }).waitFor();
	await shot(reg, 'register-invite');
	await reg.getByLabel('User name').fill('ivy');
	await reg.getByLabel('Password (at least').fill('ivy-password');
	await reg.getByLabel('Password again').fill('ivy-password');
	await reg.getByRole('button', { name: 'Create account' }).click();
	await reg.getByRole('heading', { name: 'Dashboard' }).waitFor();
	await reg.getByTestId('whoami').filter({ hasText: 'ivy' }).first().waitFor({ state: 'attached' });
	const who = await (await guest.request.get('/v1/auth/whoami')).json();
	check(
		who.memberships.length === 1 && who.memberships[0].project === 'team-a' && who.memberships[0].role === 'viewer',
		`ivy's memberships: ${JSON.stringify(who.memberships)}`
	);
	await guest.close();
	const again = await browser.newContext({ viewport: DESKTOP, baseURL: URL });
	watchErrors(again, errors);
	const used = await again.newPage();
	await used.goto(link);
	await used.getByText('This invite link is invalid, expired or already used').waitFor();
	await again.close();

	step('with self-registration on, the login page offers an account to anyone');
	await admin.page.reload();
	await admin.page.locator('[data-invite=used]').first().waitFor();
	const open = admin.page.getByLabel('Anyone who reaches this server may create an account');
	check(!(await open.isChecked()), 'self-registration is on by default');
	const patched = () => admin.page.waitForResponse((r) => r.url().endsWith('/v1/settings') && r.request().method() === 'PATCH');
	await Promise.all([patched(), open.check()]);
	const anyone = await browser.newContext({ viewport: PHONE, baseURL: URL });
	watchErrors(anyone, errors);
	const self = await anyone.newPage();
	await self.goto('/login');
	await self.getByRole('link', { name: 'Create an account' }).click();
	await self.getByLabel('User name').fill('sam');
	await self.getByLabel('Password (at least').fill('sam-password');
	await self.getByLabel('Password again').fill('other-password');
	await self.getByRole('button', { name: 'Create account' }).click();
	await self.getByText('the two passwords differ').waitFor();
	await self.getByLabel('Password again').fill('sam-password');
	await self.getByRole('button', { name: 'Create account' }).click();
	await self.getByRole('heading', { name: 'Dashboard' }).waitFor();
	await self.getByText('You are in no project yet').waitFor();
	await shot(self, 'dashboard-new-account-phone');
	await anyone.close();
	await Promise.all([patched(), open.uncheck()]);
	const closed = await (await admin.context.request.get('/v1/auth/signup')).json();
	check(closed.self_registration === false, `after turning it off: ${JSON.stringify(closed)}`);
	await admin.context.close();

	step('a viewer sees the VM without any action, and a direct API mutation fails');
	const viewer = await session('vera', DESKTOP);
	await viewer.page.goto(`/vms/${vmId}`);
	await state(viewer.page, 'running');
	await viewer.page.getByTestId('read-only').waitFor();
	check((await viewer.page.locator('[data-action]').count()) === 0, 'the viewer sees action buttons');
	const refused = await viewer.context.request.post(`/v1/vms/${vmId}/stop`);
	check(refused.status() === 403, `the viewer's stop got ${refused.status()}, not 403`);
	const body = await refused.json();
	check(/this needs member/.test(body.error.message), `message: ${body.error.message}`);
	await viewer.page.goto('/vms');
	await viewer.page.locator('tr[data-vm="web-e2e"]').waitFor();
	check((await viewer.page.locator(`a[href="/vms/${B_VM}"]`).count()) === 0, 'the viewer sees team-b\'s VM');

	step('alice deletes the VM; the viewer sees it go without a reload');
	await viewer.page.goto(`/vms/${vmId}`);
	await state(viewer.page, 'running');
	await page.goto(`/vms/${vmId}`);
	await state(page, 'running');
	await page.locator('button[data-action=delete]').click();
	// A running guest is stopped (ACPI, then killed after the node's stop
	// timeout) before its files go.
	await state(page, 'deleted', BOOT);
	await state(viewer.page, 'deleted', 30_000);
	check(
		(await page.locator('button[data-action]:not([disabled])').count()) === 0,
		'a deleted VM still offers an action'
	);
	await viewer.context.close();

	step('an environment made from the form runs one command on every VM, then goes');
	await page.goto('/environments');
	await page.getByLabel('Name', { exact: true }).fill('compat');
	await page.getByLabel('Image-name prefixes (comma-separated)').fill('tiny');
	await page.getByRole('button', { name: 'Create environment' }).click();
	await page.waitForURL(/\/environments\/[0-9a-f-]{36}$/);
	await page.locator('[data-testid=env-state] [data-state=ready]').waitFor({ timeout: BOOT });
	await page.getByLabel('Command').fill("sh -c 'uname -s; sleep 3; echo done; exit 3'");
	await page.getByRole('button', { name: 'Run', exact: true }).click();
	const result = page.locator('[data-result="compat-tiny"]');
	// The first line shows while the command still runs.
	await result.locator('[data-stream=stdout]').waitFor({ timeout: 60_000 });
	check(
		(await result.locator('[data-outcome]').getAttribute('data-outcome')) === 'running',
		'the output shows only once the command has ended'
	);
	check((await result.locator('[data-stream=stdout]').innerText()).trim() === 'Linux', 'the first line');
	await result.locator('[data-outcome=failed]').waitFor({ timeout: 60_000 });
	check((await result.locator('[data-outcome]').innerText()).trim() === 'exit 3', 'the exit code');
	check(
		(await result.locator('[data-stream=stdout]').innerText()).trim() === 'Linux\ndone',
		'the whole output'
	);
	await page.getByTestId('run-done').waitFor();
	check((await page.getByTestId('run-done').innerText()).startsWith('exit 0 on 0 of 1 VMs'), 'the count');
	await shot(page, 'environment-run');

	step('a file copied to every VM from the page comes back from each');
	const text = `pushed from the console ${Date.now()}\n`;
	await page.locator('#push-file').setInputFiles({
		name: 'hello.txt',
		mimeType: 'text/plain',
		buffer: Buffer.from(text)
	});
	await page.getByRole('button', { name: 'Copy to every VM' }).click();
	const copy = page.locator('[data-push="compat-tiny"] [data-outcome=ok]');
	await copy.waitFor({ timeout: 60_000 });
	check((await copy.innerText()).includes(`${text.length} bytes at /tmp/hello.txt`), 'the copy');
	await page.locator('#get-path').fill('/tmp/hello.txt');
	await page.getByRole('button', { name: 'Get from every VM' }).click();
	const download = page.locator('[data-get="compat-tiny"] a');
	check((await download.getAttribute('download')) === 'compat-tiny-hello.txt', 'the saved name');
	const back = await download.evaluate((a) => fetch(a.href).then((r) => r.text()));
	check(back === text, `the file came back as ${JSON.stringify(back)}`);
	await page.getByRole('button', { name: 'Delete environment' }).click();
	await page.locator('[data-testid=env-state] [data-state=deleted]').waitFor({ timeout: BOOT });
	await page.goto('/environments');
	await page.getByText('No environments yet.').waitFor();

	step('a Python snippet run from the Run page streams its output and ends with its exit code');
	await page.getByRole('link', { name: 'Run code' }).click();
	await page.getByLabel('Language').selectOption('python');
	await page.getByLabel('Code').fill('import sys\nprint(6 * 7)\nprint("to stderr", file=sys.stderr)');
	await page.getByRole('button', { name: 'Run', exact: true }).click();
	await page.getByTestId('run-output').filter({ hasText: '42' }).waitFor({ timeout: BOOT });
	await page.getByTestId('run-state').filter({ hasText: 'exited (exit code 0)' }).waitFor({ timeout: 60_000 });
	check((await page.getByTestId('run-output').innerText()).includes('to stderr'), 'stderr is shown');
	await page.locator('tr[data-run]').first().waitFor();
	await shot(page, 'run-code');

	step('an expired session sends the browser to the login page with a message');
	await context.clearCookies();
	await expectRefusal(401, async () => {
		// A click inside the app (no reload): its next request is refused.
		await page.getByRole('link', { name: 'Images' }).click();
		await page.waitForURL('**/login', { timeout: 15_000 });
		await page.getByText('Your session has expired. Log in again to continue.').waitFor();
	});

	step('logging out ends the session');
	await page.getByLabel('User name').fill('alice');
	await page.getByLabel('Password').fill(PASSWORD);
	await page.getByRole('button', { name: 'Log in' }).click();
	await page.getByRole('heading', { name: 'Dashboard' }).waitFor();
	check(
		(await context.storageState()).origins.every((o) => o.localStorage.length === 0),
		'something was put in localStorage'
	);
	await page.getByRole('button', { name: 'Log out' }).click();
	await page.getByText('You are logged out.').waitFor();
	const after = await context.request.get('/v1/auth/whoami');
	check(after.status() === 401, `whoami after logout: ${after.status()}`);
	await context.close();

	check(errors.length === 0, `browser console errors:\n${errors.join('\n')}`);
	ok = true;
	console.log(`web console end-to-end: ok (screenshots in ${SHOTS})`);
} catch (e) {
	await dump().catch(() => undefined);
	throw e;
} finally {
	await browser.close();
	if (!ok && errors.length) console.error(`browser console errors:\n${errors.join('\n')}`);
}
