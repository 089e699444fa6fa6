// A worker process for the process-level tests (SIGKILL, SIGTERM).
//
//   node worker_main.js URL KEY QUEUE LEASE_SECONDS SHUTDOWN_GRACE MARKER_DIR
//
// Kind `test.sleep` writes MARKER_DIR/started-<job id>-<pid>, sleeps `args.seconds`, then
// writes MARKER_DIR/done-<job id>-<pid> and completes. The sleep ends early when `job.signal`
// aborts (the job handed back at shutdown, its lease lost).

import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

import { Worker } from '../src/index.js';

const [url, key, queue, lease, grace, markers] = process.argv.slice(2);
const worker = new Worker({
  url,
  key,
  queues: [queue],
  concurrency: 2,
  leaseSeconds: Number(lease),
  waitSeconds: 1,
  shutdownGrace: Number(grace),
  workerId: `node-${process.pid}`,
  logger: { info: console.error, warn: console.error, error: console.error },
});
worker.handle('test.sleep', async (args, job) => {
  writeFileSync(join(markers, `started-${job.id}-${process.pid}`), '');
  await sleep(args.seconds * 1000, undefined, { signal: job.signal });
  writeFileSync(join(markers, `done-${job.id}-${process.pid}`), '');
});
await worker.run();
