// A Conveyor worker for Node: claims jobs from a Conveyor server over HTTP and runs them.
//
//   import { Worker } from '@conveyor/worker';
//   const worker = new Worker({ url: 'http://127.0.0.1:8080', key, queues: ['default'] });
//   worker.handle('email.send', async (args, job) => { ... });
//   await worker.run();

export { ApiError, Client, LeaseLost, TERMINAL_STATES } from './client.js';
export { PermanentFailure, RetryAfter, Snooze, describeError } from './outcome.js';
export { NO_HANDLER_SNOOZE, Worker } from './worker.js';
