import { render, screen } from '@testing-library/svelte';
import { describe, expect, it } from 'vitest';
import Bar from './Bar.svelte';
import StateBadge from './StateBadge.svelte';

describe('components', () => {
	it('a state badge names the state and colours it', () => {
		render(StateBadge, { state: 'running' });
		const b = screen.getByText('running');
		expect(b.dataset.state).toBe('running');
		expect(b.className).toContain('emerald');
	});
	it('an error state is red', () => {
		render(StateBadge, { state: 'error' });
		expect(screen.getByText('error').className).toContain('red');
	});
	it('a capacity bar is a meter with its value', () => {
		render(Bar, { label: 'Memory reserved', used: 3, total: 4, text: '3 / 4' });
		const m = screen.getByRole('meter', { name: 'Memory reserved' });
		expect(m.getAttribute('aria-valuenow')).toBe('75');
		expect(screen.getByText('3 / 4')).toBeTruthy();
	});
});
