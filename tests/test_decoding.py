"""Beam search and greedy decoding on a scripted step function: images that finish early leave the batch."""
import numpy as np

from aicrl.decoding import GenerationOptions, beam_search, greedy


class PerImageSteps:
    """A StepDecoder whose next word depends on the image (its id is features[:, 0, 0]) and the
    previous word; it records how many rows every step was asked for."""

    def __init__(self, tables: np.ndarray):
        self.tables, self.rows_seen = tables.astype(np.float32), []

    def start(self, features, styles, repeat=1, concepts=None):
        return np.repeat(features[:, 0, 0].astype(int), repeat)

    def step(self, words, state):
        self.rows_seen.append(len(words))
        return self.tables[state, words], state, np.ones((len(words), 1), np.float32)

    def reorder(self, state, rows):
        return state[rows]

    select = reorder


def short_and_long() -> PerImageSteps:
    """Image 0 says one word ("4"), image 1 five ("4 5 6 7 8"); ids 0-3 are the special tokens."""
    t = np.full((2, 9, 9), -8.0)
    t[0, 1, 4] = t[0, 4, 2] = 0.0
    t[1, 1, 4] = t[1, 4, 5] = t[1, 5, 6] = t[1, 6, 7] = t[1, 7, 8] = t[1, 8, 2] = 0.0
    return PerImageSteps(t)


def test_a_finished_image_leaves_the_batch_and_changes_nothing():
    features = np.arange(2, dtype=np.float32).reshape(2, 1, 1)
    for decode, k in ((lambda s, f: beam_search(s, f, GenerationOptions(1, 2, beam_size=3, n_best=3)), 3),
                      (lambda s, f: [[h] for h in greedy(s, f, GenerationOptions(1, 2))], 1)):
        steps = short_and_long()
        batched = decode(steps, features)
        assert [h.tokens for h in batched[0]][:1] == [[4]] and batched[1][0].tokens == [4, 5, 6, 7, 8]
        # the short image's rows stop being computed once all its beams have ended
        assert steps.rows_seen[0] == 2 * k and steps.rows_seen[-1] == k
        for i in range(2):
            single = decode(short_and_long(), features[i:i + 1])[0]
            assert [h.tokens for h in single] == [h.tokens for h in batched[i]]
            assert np.allclose([h.logprob for h in single], [h.logprob for h in batched[i]])
            assert all(h.attention.shape == (len(h.tokens), 1) for h in batched[i])
