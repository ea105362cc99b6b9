/* The update of a flat bucket on the CPU in one pass (dessilbi.core.cpu_kernel builds and
 * loads this file; the formula: its docstring). float32 only. Every row is updated by one
 * thread, so the result does not depend on the number of threads. */
#include <math.h>
#include <pthread.h>
#include <stdint.h>

enum { NONE = 0, GROUP = 1, LASSO = 2 };

typedef struct {
    float *const *grads;   /* the gradient of each tensor, where autograd left it */
    const int64_t *starts; /* tensor i holds rows starts[i] .. starts[i + 1] - 1 */
    int64_t tensors, k;    /* number of tensors, row length */
    float *b, *w, *v;      /* momentum buffer (or NULL), weights, V (or NULL): rows x k */
    const float *mask;     /* fixed mask (rows x k) or NULL */
    const float *lams;     /* one threshold per row, or NULL for lam */
    float lam, sign, decay, momentum, dampen, v_rate, pull_rate, step, kappa, norm_scale;
    int penalty, nesterov, outside;
    int64_t first, last;   /* the rows of one thread */
} job;

/* B, V and W of n entries whose gradient is g; shrink >= 0 is the group's factor (group
 * penalty), pull its pull rate; for the lasso every entry has its own, from lam. HAS_B,
 * MASKED and PENALTY are constants at every call (span), so that the loop has no
 * conditional loads and vectorises. */
static inline __attribute__((always_inline)) void span_of(
    const job *p, const float *restrict g, int64_t at, int64_t n, float shrink, float pull,
    float lam, const int HAS_B, const int MASKED, const int PENALTY) {
    float *restrict b = p->b + (HAS_B ? at : 0);
    float *restrict w = p->w + at;
    float *restrict v = p->v + (PENALTY != NONE ? at : 0);
    const float *restrict m = p->mask + (MASKED ? at : 0);
    const float sign = p->sign, decay = p->decay, mom = p->momentum, damp = p->dampen;
    const float v_rate = p->v_rate, step = p->step, kappa = p->kappa;
    const int nesterov = p->nesterov, outside = p->outside, plain = damp == 1.0f;
#pragma omp simd
    for (int64_t j = 0; j < n; j++) {
        float wj = w[j];
        float gj = sign * g[j];
        if (MASKED) gj = gj * m[j];
        if (decay != 0.0f) gj = gj + decay * wj;
        float d = gj;
        if (HAS_B) {
            float bn = plain ? gj + mom * b[j] : b[j] * mom + damp * gj;
            b[j] = bn;
            d = nesterov ? gj + mom * bn : bn;
        }
        if (PENALTY == GROUP) {
            float gap = wj - kappa * (v[j] * shrink);
            v[j] = v[j] + v_rate * gap;
            wj = wj - pull * gap;
        } else if (PENALTY == LASSO) {
            float vj = v[j];
            float clipped = vj < -lam ? -lam : (vj > lam ? lam : vj);
            float gap = wj + kappa * (clipped - vj);
            v[j] = vj + v_rate * gap;
            wj = wj - ((outside && !(fabsf(vj) <= lam)) ? 0.0f : pull) * gap;
        }
        wj = wj - step * d;
        w[j] = MASKED ? wj * m[j] : wj;
    }
}

#define SPAN(HAS_B, MASKED, PENALTY) \
    span_of(p, g, at, n, shrink, pull, lam, HAS_B, MASKED, PENALTY)

static void span(const job *p, const float *restrict g, int64_t at, int64_t n, float shrink,
                 float pull, float lam) {
    switch (p->penalty * 4 + (p->b != 0) * 2 + (p->mask != 0)) {
        case 0: SPAN(0, 0, NONE); break;
        case 1: SPAN(0, 1, NONE); break;
        case 2: SPAN(1, 0, NONE); break;
        case 3: SPAN(1, 1, NONE); break;
        case 4: SPAN(0, 0, GROUP); break;
        case 5: SPAN(0, 1, GROUP); break;
        case 6: SPAN(1, 0, GROUP); break;
        case 7: SPAN(1, 1, GROUP); break;
        case 8: SPAN(0, 0, LASSO); break;
        case 9: SPAN(0, 1, LASSO); break;
        case 10: SPAN(1, 0, LASSO); break;
        default: SPAN(1, 1, LASSO); break;
    }
}

/* The rows first .. last - 1, tensor by tensor. */
static void *rows(void *arg) {
    const job *p = arg;
    const int64_t k = p->k;
    for (int64_t t = 0; t < p->tensors; t++) {
        int64_t lo = p->starts[t] > p->first ? p->starts[t] : p->first;
        int64_t hi = p->starts[t + 1] < p->last ? p->starts[t + 1] : p->last;
        if (lo >= hi) continue;
        const float *g = p->grads[t] + (lo - p->starts[t]) * k;
        if (p->penalty != GROUP && !p->lams) {
            span(p, g, lo * k, (hi - lo) * k, 0.0f, p->pull_rate, p->lam);
            continue;
        }
        if (p->penalty != GROUP) {
            for (int64_t r = lo; r < hi; r++)  /* a threshold per row */
                span(p, g + (r - lo) * k, r * k, k, 0.0f, p->pull_rate, p->lams[r]);
            continue;
        }
        for (int64_t r = lo; r < hi; r++) {
            const float *restrict vr = p->v + r * k;
            float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
            for (int64_t j = 0; j < k; j++) squares += vr[j] * vr[j];
            float norm = sqrtf(squares) * p->norm_scale;
            float lam = p->lams ? p->lams[r] : p->lam;
            float shrink = fmaxf(norm - lam, 0.0f) / fmaxf(norm, 1.17549435e-38f);
            float pull = (p->outside && shrink != 0.0f) ? 0.0f : p->pull_rate;
            span(p, g + (r - lo) * k, r * k, k, shrink, pull, lam);
        }
    }
    return 0;
}

/* One step of a bucket of starts[tensors] rows, split over up to `threads` threads (a part
 * whose thread cannot be started is done by the caller). */
void dessilbi_step(float *const *grads, const int64_t *starts, int64_t tensors, int64_t k,
                   float *b, float *w, float *v, const float *mask, const float *lams,
                   float lam, float sign, float decay, float momentum, float dampen,
                   float v_rate, float pull_rate, float step, float kappa, float norm_scale,
                   int penalty, int nesterov, int outside, int64_t threads) {
    job base = {grads, starts, tensors, k, b, w, v, mask, lams, lam, sign, decay, momentum,
                dampen, v_rate, pull_rate, step, kappa, norm_scale, penalty, nesterov, outside,
                0, starts[tensors]};
    if (threads > 64) threads = 64;
    if (threads <= 1) {
        rows(&base);
        return;
    }
    job jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
    const int64_t total = starts[tensors];
    for (int64_t i = 0; i < threads; i++) {
        jobs[i] = base;
        jobs[i].first = total * i / threads;
        jobs[i].last = total * (i + 1) / threads;
    }
    for (int64_t i = 1; i < threads; i++)
        started[i] = pthread_create(&ids[i], 0, rows, &jobs[i]) == 0;
    rows(&jobs[0]);
    for (int64_t i = 1; i < threads; i++) {
        if (started[i])
            pthread_join(ids[i], 0);
        else
            rows(&jobs[i]);
    }
}
