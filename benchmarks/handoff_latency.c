/* How long does it take CPU 0 and CPU 1 to pass a cache line back and forth?
 *
 * Two threads, pinned to the first two CPUs this process may use, hand a token to each other
 * through one atomic flag, each spin-waiting with PAUSE the way onnxruntime's thread pool does.
 * Prints the median round trip in nanoseconds (then the 90th and 99th percentiles).
 *
 * Why: on a VM the host decides where the vCPUs run.  On the machine the README's figures come
 * from, the round trip was ~90-110 ns for minutes at a time, then ~400-440 ns (vCPUs on cores
 * that share no cache) for tens of seconds, and onnxruntime's 2-thread runs of graphs made of
 * many short operators (a rank-1 rewrite) took 1.6x longer in those periods while the dense
 * original did not change.  benchmarks/bench_rewrite.py runs this before and after every pass
 * so each pass can be told apart by placement.
 *
 * Build: cc -O2 -pthread -o handoff_latency handoff_latency.c
 * Usage: handoff_latency [ROUND_TRIPS=2000] [GAP_US=20]
 *        (GAP_US: the main thread works this long between hand-offs while the other spins)
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#elif defined(__aarch64__)
#define CPU_RELAX() __asm__ __volatile__("yield")
#else
#define CPU_RELAX() ((void)0)
#endif

static _Atomic int token = 0;
static _Atomic int stop = 0;
static int cpus[2] = {-1, -1};

static void pin(int cpu) {
    if (cpu < 0) return;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *echo(void *arg) {
    (void)arg;
    pin(cpus[1]);
    for (;;) {
        while (atomic_load_explicit(&token, memory_order_acquire) != 1) {
            if (atomic_load_explicit(&stop, memory_order_relaxed)) return NULL;
            CPU_RELAX();
        }
        atomic_store_explicit(&token, 0, memory_order_release);
    }
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 2000;
    double gap_ns = (argc > 2 ? atof(argv[2]) : 20.0) * 1e3;
    if (n < 10) n = 10;
    cpu_set_t allowed;
    if (sched_getaffinity(0, sizeof allowed, &allowed) == 0) {
        for (int c = 0, k = 0; c < CPU_SETSIZE && k < 2; c++)
            if (CPU_ISSET(c, &allowed)) cpus[k++] = c;
    }
    if (cpus[1] < 0) {
        fprintf(stderr, "handoff_latency: needs two CPUs\n");
        return 2;
    }
    pin(cpus[0]);
    double *rt = malloc(sizeof(double) * n);
    if (!rt) return 2;
    pthread_t th;
    if (pthread_create(&th, NULL, echo, NULL) != 0) return 2;
    for (int i = 0; i < n; i++) {
        double until = now_ns() + gap_ns;
        while (now_ns() < until) CPU_RELAX();
        double t0 = now_ns();
        atomic_store_explicit(&token, 1, memory_order_release);
        while (atomic_load_explicit(&token, memory_order_acquire) != 0) CPU_RELAX();
        rt[i] = now_ns() - t0;
    }
    atomic_store_explicit(&stop, 1, memory_order_relaxed);
    pthread_join(th, NULL);
    qsort(rt, n, sizeof(double), by_value);
    printf("%.0f %.0f %.0f\n", rt[n / 2], rt[n * 9 / 10], rt[n * 99 / 100]);
    free(rt);
    return 0;
}
