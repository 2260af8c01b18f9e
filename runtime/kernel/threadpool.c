/* A small pthread pool (no OpenMP: Apple clang ships none, Termux only a static libomp).
 *
 * pool_run(fn, ctx, n_chunks) calls fn(ctx, c, n_chunks) once for every chunk c in 0..n_chunks-1;
 * the caller and the workers take chunks from a shared counter, so a fast core does more of them
 * (big.LITTLE phones) and a worker that is late (descheduled on a busy machine) is not waited for:
 * the caller closes the job when no chunk is left and waits only for workers that already joined.
 * Workers spin briefly before sleeping, because a decode step issues hundreds of short matvecs back
 * to back and a condition-variable wake-up costs tens of microseconds. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "kernel.h"

#if defined(__x86_64__) || defined(__i386__)
#define CPU_RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ volatile("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

/* Spin up to SPIN_NS before sleeping on a condition variable. Time-based, because one `pause`
 * costs from a few cycles (ARM yield, older x86) to ~140 cycles (Skylake and later). */
#define SPIN_NS 100000

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Spin until (*v == value) == want (returns 1) or the spin budget is spent (returns 0). */
static int spin_until(atomic_int *v, int value, int want) {
    const int64_t deadline = now_ns() + SPIN_NS;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if ((atomic_load(v) == value) == want) return 1;
            CPU_RELAX();
        }
        if (now_ns() > deadline) return 0;
    }
}

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv_work = PTHREAD_COND_INITIALIZER, cv_done = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER; /* one pool_run at a time */

static int n_threads = 1;     /* configured count, caller included */
static pthread_t *workers;    /* n_workers = n_threads - 1 once started */
static int n_workers;
static int created_gen;       /* generation when the current workers were created */
static int atfork_done;

/* The current job. `generation` is bumped once per job (and to stop); `open_gen` is the generation
 * still accepting helpers (-1 once the caller closed it); `active` counts helpers inside it. */
static atomic_int generation;
static atomic_int open_gen = -1;
static atomic_int active;
static atomic_int next_chunk;
static atomic_int stopping;
static pool_task job_fn;
static void *job_ctx;
static int job_chunks;

static void take_chunks(void) {
    int c;
    while ((c = atomic_fetch_add(&next_chunk, 1)) < job_chunks) job_fn(job_ctx, c, job_chunks);
}

static void *worker_main(void *arg) {
    (void)arg;
    int seen = created_gen; /* jobs posted after creation are ours */
    for (;;) {
        if (!spin_until(&generation, seen, 0)) {
            pthread_mutex_lock(&mu);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&cv_work, &mu);
            pthread_mutex_unlock(&mu);
        }
        seen = atomic_load(&generation);
        if (atomic_load(&stopping)) return NULL;
        /* join, then check the job is still open (seq_cst pairs with the caller's close-then-read) */
        atomic_fetch_add(&active, 1);
        if (atomic_load(&open_gen) == seen) take_chunks();
        if (atomic_fetch_sub(&active, 1) == 1) {
            pthread_mutex_lock(&mu);
            pthread_cond_broadcast(&cv_done);
            pthread_mutex_unlock(&mu);
        }
    }
}

static void stop_workers(void) {
    if (!n_workers) return;
    atomic_store(&stopping, 1);
    pthread_mutex_lock(&mu);
    atomic_fetch_add(&generation, 1);
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    for (int i = 0; i < n_workers; i++) pthread_join(workers[i], NULL);
    free(workers);
    workers = NULL;
    n_workers = 0;
    atomic_store(&stopping, 0);
}

/* A forked child has no worker threads: forget them (they are not ours to join). */
static void after_fork_child(void) {
    workers = NULL;
    n_workers = 0;
    atomic_store(&active, 0);
    atomic_store(&open_gen, -1);
    pthread_mutex_init(&mu, NULL);
    pthread_mutex_init(&run_lock, NULL);
    pthread_cond_init(&cv_work, NULL);
    pthread_cond_init(&cv_done, NULL);
}

static int start_workers(void) {
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, after_fork_child);
        atfork_done = 1;
    }
    const int want = n_threads - 1;
    if (want <= 0) return 0;
    workers = calloc((size_t)want, sizeof(pthread_t));
    if (!workers) return -1;
    created_gen = atomic_load(&generation);
    for (int i = 0; i < want; i++) {
        if (pthread_create(&workers[i], NULL, worker_main, NULL) != 0) {
            n_workers = i;
            stop_workers();
            return -1;
        }
        n_workers = i + 1;
    }
    return 0;
}

int pool_set_threads(int n) {
    if (n < 1) return -1;
    pthread_mutex_lock(&run_lock);
    stop_workers();
    n_threads = n;
    pthread_mutex_unlock(&run_lock);
    return 0;
}

int pool_threads(void) { return n_threads; }

void pool_run(pool_task fn, void *ctx, int n_chunks) {
    pthread_mutex_lock(&run_lock);
    if (n_workers != n_threads - 1 && start_workers() != 0) n_threads = 1; /* degrade, stay correct */
    job_fn = fn;
    job_ctx = ctx;
    job_chunks = n_chunks;
    atomic_store(&next_chunk, 0);
    if (n_workers == 0 || n_chunks <= 1) {
        take_chunks();
        pthread_mutex_unlock(&run_lock);
        return;
    }
    pthread_mutex_lock(&mu);
    const int gen = atomic_load(&generation) + 1;
    atomic_store(&open_gen, gen);
    atomic_store(&generation, gen);
    pthread_cond_broadcast(&cv_work);
    pthread_mutex_unlock(&mu);
    take_chunks();
    atomic_store(&open_gen, -1); /* late workers skip this job */
    if (!spin_until(&active, 0, 1)) {
        pthread_mutex_lock(&mu);
        while (atomic_load(&active) != 0) pthread_cond_wait(&cv_done, &mu);
        pthread_mutex_unlock(&mu);
    }
    pthread_mutex_unlock(&run_lock);
}

/* Chunks for `rows` rows: a few per thread for balance, none smaller than `min_rows`. */
int pool_chunks(int rows, int min_rows) {
    const int by_size = rows / (min_rows > 0 ? min_rows : 1);
    const int want = n_threads == 1 ? 1 : 4 * n_threads;
    const int n = want < by_size ? want : by_size;
    return n > 1 ? n : 1;
}
