/* The draw of the rollout engine's sampler (rollout/sampling.py, ``sample``): one call per decode pass instead
 * of a dozen small tensor ops (about 4% of a rollout's time on a 2-core machine).
 *
 * Per row b of ``probs`` [rows, a] (the sampling distribution, already exp'd by the caller): the cumulative sums
 * in fp64, summed one entry after the other as torch's ``cumsum`` of the fp64 copy sums them (the same numbers,
 * bit for bit), the first entry whose cumulative sum exceeds u_b * total (``searchsorted(right=True)``), or,
 * where u_b * total rounded up to the total, the first entry that reaches the total (the last token of positive
 * probability).  Writes that entry's log-prob (``logp``), its token id (``allowed[pick]``, or ``pick`` when
 * ``allowed`` is NULL) and that token's plain log-prob (``plain`` [rows, v]).
 *
 * Returns 0, or 1 + b for the first row whose total is not finite or not positive (the caller raises). */
#include <math.h>
#include <stdint.h>

int sample_pick(const float *probs, const float *logp, const float *plain, const int64_t *allowed, const double *u,
                int64_t *tokens, float *sample_logp, float *plain_logp, int rows, int a, int v) {
    for (int b = 0; b < rows; b++) {
        const float *p = probs + (int64_t)b * a;
        double total = 0.0;
        for (int i = 0; i < a; i++) total += (double)p[i];
        if (!isfinite(total) || !(total > 0.0)) return 1 + b;
        const double x = u[b] * total;
        double cdf = 0.0;
        int pick = a;
        for (int i = 0; i < a; i++) {
            cdf += (double)p[i];
            if (cdf > x) {
                pick = i;
                break;
            }
        }
        if (pick == a) { /* x rounded up to the total: the first entry at the total */
            cdf = 0.0;
            for (int i = 0; i < a; i++) {
                cdf += (double)p[i];
                if (!(cdf < total)) {
                    pick = i;
                    break;
                }
            }
        }
        const int64_t token = allowed ? allowed[pick] : pick;
        tokens[b] = token;
        sample_logp[b] = logp[(int64_t)b * a + pick];
        plain_logp[b] = plain[(int64_t)b * v + token];
    }
    return 0;
}
