// Service worker: the app shell (page, scripts, wasm) works offline after the first visit.
// Network first, so a new build shows up at once; the cache answers when the network does not.
// Model downloads (Range requests, other origins) pass through: models live in IndexedDB.
const CACHE = 'sdxl-app-v1';
const SHELL = ['./', 'index.html', 'app.js', 'style.css', 'sdxl.js', 'worker.js', 'examples/embed.html'];

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    // The wasm build's files (their snippet folder is named by a hash), listed by web/build.sh.
    const pkg = await (await fetch('pkg/files.json', { cache: 'no-store' })).json();
    await cache.addAll([...SHELL, ...pkg.map((f) => `pkg/${f}`)]);
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (request.method !== 'GET' || request.headers.has('range') || url.origin !== location.origin || url.pathname.includes('/models/')) return;
  event.respondWith((async () => {
    try {
      const response = await fetch(request);
      if (response.ok) (await caches.open(CACHE)).put(request, response.clone());
      return response;
    } catch (offline) {
      const cached = await caches.match(request, { ignoreSearch: true });
      if (cached) return cached;
      throw offline;
    }
  })());
});
