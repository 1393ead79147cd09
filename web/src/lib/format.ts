// Small pure helpers shared by the pages.

/** MiB as a short human size. */
export function mib(n: number): string {
	if (n >= 1024 * 1024) return `${round(n / (1024 * 1024))} TiB`;
	if (n >= 1024) return `${round(n / 1024)} GiB`;
	return `${n} MiB`;
}

/** Bytes as a short human size. */
export function bytes(n: number): string {
	const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
	let i = 0;
	while (n >= 1024 && i < units.length - 1) {
		n /= 1024;
		i++;
	}
	return `${i === 0 ? n : round(n)} ${units[i]}`;
}

function round(x: number): string {
	return x >= 10 ? x.toFixed(0) : x.toFixed(1).replace(/\.0$/, '');
}

/** A percentage 0-100 of used over total (0 when total is 0). */
export function percent(used: number, total: number): number {
	if (!total || total <= 0) return 0;
	return Math.max(0, Math.min(100, Math.round((used / total) * 100)));
}

/** "3 s ago", "5 min ago", or the date. */
export function ago(iso: string | null | undefined, now = Date.now()): string {
	if (!iso) return 'never';
	const t = Date.parse(iso);
	if (Number.isNaN(t)) return iso;
	const s = Math.round((now - t) / 1000);
	if (s < 5) return 'just now';
	if (s < 60) return `${s} s ago`;
	if (s < 3600) return `${Math.floor(s / 60)} min ago`;
	if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
	return new Date(t).toISOString().slice(0, 10);
}

/** The ssh command for a VM's forwarded port 22, if it has one. */
export function sshCommand(
	ports: { guest_port: number; host_port: number; host: string }[],
	user: string | null | undefined
): string | null {
	if (!user) return null;
	const p = ports.find((x) => x.guest_port === 22);
	if (!p) return null;
	return `ssh -p ${p.host_port} ${user}@${p.host}`;
}

/** Parses "k=v" lines (or comma-separated) into labels; throws on a bad line. */
export function parseLabels(text: string): Record<string, string> {
	const out: Record<string, string> = {};
	for (const raw of text.split(/[\n,]/)) {
		const line = raw.trim();
		if (!line) continue;
		const i = line.indexOf('=');
		if (i <= 0) throw new Error(`label "${line}" is not key=value`);
		out[line.slice(0, i).trim()] = line.slice(i + 1).trim();
	}
	return out;
}

/**
 * The points of an SVG polyline drawing `values` left to right in a
 * `width` x `height` box, 0 at the bottom and `max` (at least the largest
 * value) at the top.
 */
export function sparkline(values: number[], width: number, height: number, max = 0): string {
	if (values.length === 0) return '';
	const top = Math.max(max, ...values, 1e-9);
	const step = values.length > 1 ? width / (values.length - 1) : 0;
	return values
		.map((v, i) => `${+(i * step).toFixed(1)},${+(height - (Math.max(v, 0) / top) * height).toFixed(1)}`)
		.join(' ');
}
