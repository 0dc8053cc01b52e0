// Upload one file to ISS with tus-js-client, as a browser or a node program would.
// node tus_upload.mjs ENDPOINT FILE CHUNK_BYTES METADATA_JSON
// Prints {"url": ..., "blob": ..., "retries": n} once the upload succeeded; exits 1 otherwise.
import fs from 'node:fs';
import * as tus from 'tus-js-client';

const [endpoint, path, chunkSize, metadata] = process.argv.slice(2);
let blob = null;
let retries = 0;
const upload = new tus.Upload(fs.createReadStream(path), {
  endpoint,
  uploadSize: fs.statSync(path).size,
  chunkSize: Number(chunkSize),
  metadata: JSON.parse(metadata),
  retryDelays: [0, 100, 300, 1000, 2000],
  onShouldRetry: () => { retries += 1; return true; },
  onAfterResponse: (req, res) => { blob = res.getHeader('ISS-Blob-Id') || blob; },
  onError: (error) => { console.error(String(error)); process.exit(1); },
  onSuccess: () => { console.log(JSON.stringify({ url: upload.url, blob, retries })); },
});
upload.start();
