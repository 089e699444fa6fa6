// Throughput of the Node worker: N no-op jobs enqueued in batches on a fresh `conveyor serve`
// (SQLite, see test/harness.js), then timed from the worker's start until every handler has
// run and the worker has stopped (every outcome recorded).
//
//   CONVEYOR_BIN=$PWD/target/debug/conveyor node clients/node/bench/throughput.js [N] [CONCURRENCY]

import { Server } from '../test/harness.js';
import { Worker } from '../src/index.js';

const n = Number(process.argv[2] ?? 20_000);
const concurrency = Number(process.argv[3] ?? 500);
const server = await Server.start();
try {
  for (let start = 0; start < n; start += 1000) {
    const jobs = [];
    for (let i = start; i < Math.min(n, start + 1000); i++) jobs.push({ kind: 'noop', queue: 'bench', args: { i } });
    await server.admin.request('POST', '/v1/jobs/batch', { jobs });
  }
  const worker = new Worker({
    url: server.url,
    key: server.workerKey,
    queues: ['bench'],
    concurrency,
    waitSeconds: 1,
    finishBatch: 1000,
    finishIntervalMs: 50,
    logger: { info() {}, warn: console.error, error: console.error },
  });
  let done = 0;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  worker.handle('noop', () => {
    if (++done === n) finish();
  });
  const started = performance.now();
  const run = worker.run({ signals: false });
  await finished;
  worker.stop();
  await run;
  const elapsed = (performance.now() - started) / 1000;
  const left = await server.admin.request('GET', '/v1/jobs?queue=bench&state=running,available&limit=1');
  if (left.jobs.length > 0) throw new Error(`jobs left unfinished: ${JSON.stringify(left)}`);
  console.log(`node worker: ${n} jobs, concurrency ${concurrency}: ${elapsed.toFixed(2)} s, ${(n / elapsed).toFixed(0)} jobs/s`);
} finally {
  await server.close();
}
