// A single-page console: rendered in the browser, served as index.html.
export const ssr = false;
export const prerender = false;
export const trailingSlash = 'never';
