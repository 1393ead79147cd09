// The live feed: one EventSource on /v1/events for the whole console. Pages
// subscribe to VM and node changes; the browser reconnects by itself, and a
// failed reconnect asks whether the session is still valid.
import type { Event, Node, Vm } from './api/client';

/**
 * `resync` runs when the stream comes back after a break: changes made
 * while it was away may be missed, so pages read their data again.
 */
type Listener = { vm?: (v: Vm) => void; node?: (n: Node) => void; resync?: () => void };

const listeners = new Set<Listener>();
let source: EventSource | null = null;
let onLost: (() => void) | null = null;

export const live = $state({ connected: false });

/** Routes one event's data to the listeners; exported for tests. */
export function dispatch(data: string): void {
	let e: Event;
	try {
		e = JSON.parse(data) as Event;
	} catch {
		return;
	}
	for (const l of listeners) {
		if ('vm' in e) l.vm?.(e.vm);
		else if ('node' in e) l.node?.(e.node);
	}
}

/** Opens the stream (once); `lost` runs when it fails to reconnect. */
export function connect(lost: () => void): void {
	onLost = lost;
	if (source || typeof EventSource === 'undefined') return;
	source = new EventSource('/v1/events');
	let opened = false;
	source.onopen = () => {
		live.connected = true;
		if (opened) for (const l of listeners) l.resync?.();
		opened = true;
	};
	source.onmessage = (m) => dispatch(m.data);
	source.onerror = () => {
		live.connected = false;
		onLost?.();
	};
}

export function disconnect(): void {
	source?.close();
	source = null;
	live.connected = false;
}

/** Listens until the returned function is called (use in $effect). */
export function subscribe(l: Listener): () => void {
	listeners.add(l);
	return () => listeners.delete(l);
}
