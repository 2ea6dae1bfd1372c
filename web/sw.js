// Service worker: the app shell (page, scripts, wasm) works offline after the first visit, and a page
// always gets the files of one build: its JS glue never meets another build's wasm.
// web/build.sh writes pkg/build.js: the build's id and every file's sha256. Its files are cached
// under the id (checked against those hashes) and served from there; a new build changes build.js,
// so the browser installs a new service worker beside the running one. It takes over once no page
// of the old build is open (or when the page asks, see app.js), and deletes the old build's cache.
// Anything else (models: Range requests, other origins, IndexedDB) passes through.
importScripts('pkg/build.js'); // sets self.BUILD = {id, files: {path: sha256}}
const PREFIX = 'sdxl-app-';
const CACHE = PREFIX + self.BUILD.id;
const SCOPE = new URL('./', self.location).pathname;

const hex = (digest) => Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, '0')).join('');

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const cache = await caches.open(CACHE);
    try {
      await Promise.all(Object.entries(self.BUILD.files).map(async ([path, sha256]) => {
        const response = await fetch(path, { cache: 'no-store' });
        const bytes = await response.clone().arrayBuffer();
        // A server halfway through deploying another build: this install fails, the old build stays.
        if (!response.ok || hex(await crypto.subtle.digest('SHA-256', bytes)) !== sha256) {
          throw new Error(`${path} (HTTP ${response.status}) is not the file of build ${self.BUILD.id}`);
        }
        await cache.put(path, response);
      }));
    } catch (e) {
      await caches.delete(CACHE);
      throw e;
    }
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key.startsWith(PREFIX) && key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

// The page's "Reload for the new version".
self.addEventListener('message', (event) => {
  if (event.data === 'skipWaiting') self.skipWaiting();
});

self.addEventListener('fetch', (event) => {
  const { request } = event;
  const url = new URL(request.url);
  const path = url.pathname.startsWith(SCOPE) ? url.pathname.slice(SCOPE.length) || './' : null;
  if (request.method !== 'GET' || request.headers.has('range') || url.origin !== location.origin || !Object.hasOwn(self.BUILD.files, path ?? '')) return;
  event.respondWith(caches.open(CACHE).then((cache) => cache.match(path)).then((cached) => cached ?? fetch(request)));
});
