/* The compute thread pool of sti._lowbit, offered to STI's other C kernels (sti._fastmath's decode
 * attention) so that every kernel runs on the same threads: a kernel with its own pool would have
 * its threads compete with the helpers that sti._lowbit keeps spinning between products.
 *
 * sti._lowbit exports a capsule named STI_PARALLEL_CAPSULE holding a StiParallel. parallel_for
 * runs fn(ctx, task, slot) for every task in 0 .. ntask-1 on up to `threads` threads and returns
 * when all of them are done; slot (0 .. threads-1) tells tasks running at the same time apart, so a
 * task may use per-slot scratch. The calling thread always takes part (slot 0) and needs no GIL.
 * Returns 0, or -1 when out of memory (then no task has run). */
#ifndef STI_PARALLEL_H
#define STI_PARALLEL_H
#include <Python.h>

#define STI_PARALLEL_CAPSULE "sti._lowbit._parallel"
#define STI_PARALLEL_VERSION 1

typedef void (*sti_task_fn)(void *ctx, Py_ssize_t task, int slot);

typedef struct {
    int version; /* STI_PARALLEL_VERSION */
    int (*parallel_for)(sti_task_fn fn, void *ctx, Py_ssize_t ntask, int threads);
} StiParallel;

#endif
