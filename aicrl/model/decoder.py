"""The decoders, each with its whole forward pass here: Show, Attend and Tell (soft attention, the
paper's) and Up-Down (two LSTMs, top-down attention); `config.decoder` picks one (`build_decoder`).

Both answer the same calls: `start(features, styles)` -> (features, projected, style, state),
`step(words, state, features, projected, style)` -> (logits, state, attention), and `forward` for
teacher forcing. `state` is the decoder's own tuple of tensors, named by `state_names`; nobody
else looks inside it (beam search only reorders its rows).

Show, Attend and Tell:
At each step t the decoder
  1. scores every image region against the previous hidden state (additive attention) -> alpha_t,
  2. takes the weighted sum of region features, scaled by a learnt gate beta_t -> context z_t,
  3. feeds [word embedding of y_{t-1}; z_t; style embedding] to an LSTM cell,
  4. predicts y_t from the dropped-out hidden state, the context, the word embedding and the style
     (deep output).
The initial state comes from the mean region feature (and the style). An optional style label picks
one of `config.styles` (factual, humorous, romantic, or any set of personality traits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CaptionerConfig

State = tuple[torch.Tensor, ...]  # a decoder's recurrent state; only the decoder looks inside
Concepts = tuple[torch.Tensor, torch.Tensor]  # (B, K) concept ids, (B, K) their probabilities


class AdditiveAttention(nn.Module):
    def __init__(self, feature_dim: int, hidden_dim: int, attention_dim: int):
        super().__init__()
        self.project_features = nn.Linear(feature_dim, attention_dim)
        self.project_hidden = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def forward(self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor):
        """features (B, R, F), projected = project_features(features) (B, R, A), hidden (B, H)."""
        energy = self.score(torch.tanh(projected + self.project_hidden(hidden).unsqueeze(1))).squeeze(2)
        alpha = energy.softmax(dim=1)  # (B, R)
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, F)
        return context, alpha


class CaptionDecoder(nn.Module):
    """What every decoder shares: word and style embeddings, the normalised grid with its attention
    projection, and teacher forcing over the subclass's `start` and `step`."""
    state_names: tuple[str, ...] = ()

    def __init__(self, config: CaptionerConfig):
        super().__init__()
        c = self.config = config
        self.style_dim = c.style_dim if len(c.styles) > 1 else 0
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.style_embed = nn.Embedding(len(c.styles), self.style_dim) if self.style_dim else None
        self.feature_norm = nn.LayerNorm(c.feature_dim)
        self.attention = AdditiveAttention(c.feature_dim, c.hidden_dim, c.attention_dim)
        # Concepts (id 0: none) become regions: an embedding, scaled by the concept's probability.
        self.concept_embed = nn.Embedding(c.num_concepts + 1, c.feature_dim, padding_idx=0) \
            if c.concept_tokens else None

    def image_context(self, features: torch.Tensor, styles: torch.Tensor | None, concepts: Concepts | None = None):
        """Normalised features (with the concept regions after the grid), their attention projection,
        the pooled grid and the style vector (None without styles; styles None means the first style,
        factual). A grid of no regions (B, 0, F) is a caption without a photo: concepts alone."""
        features = self.feature_norm(features.float())
        pooled = features.mean(1) if features.size(1) else features.new_zeros(features.size(0), features.size(2))
        if self.concept_embed is not None:
            ids, probs = concepts if concepts is not None else (
                features.new_zeros(features.size(0), 1, dtype=torch.long), features.new_zeros(features.size(0), 1))
            features = torch.cat([features, probs.float().unsqueeze(2) * self.concept_embed(ids)], 1)
        style = None
        if self.style_embed is not None:
            if styles is None:
                styles = torch.zeros(features.size(0), dtype=torch.long, device=features.device)
            style = self.style_embed(styles)
        return features, self.attention.project_features(features), pooled, style

    def forward(self, features: torch.Tensor, captions: torch.Tensor, styles: torch.Tensor | None = None,
                concepts: Concepts | None = None):
        """Teacher forcing. captions (B, T) start with <start>; returns logits (B, T-1, V) for
        captions[:, 1:] and attention (B, T-1, R)."""
        features, projected, style, state = self.start(features, styles, concepts)
        logits, alphas = [], []
        for t in range(captions.size(1) - 1):
            step_logits, state, alpha = self.step(captions[:, t], state, features, projected, style)
            logits.append(step_logits)
            alphas.append(alpha)
        return torch.stack(logits, 1), torch.stack(alphas, 1)


class AttentionLSTMDecoder(CaptionDecoder):
    state_names = ("h", "c")  # the recurrent state's tensors, in order (ONNX graphs name them so)

    def __init__(self, config: CaptionerConfig):
        super().__init__(config)
        c, style_dim = config, self.style_dim
        self.init_h = nn.Linear(c.feature_dim + style_dim, c.hidden_dim)
        self.init_c = nn.Linear(c.feature_dim + style_dim, c.hidden_dim)
        self.gate = nn.Linear(c.hidden_dim, c.feature_dim)  # beta_t, "is the model looking at the image"
        self.lstm = nn.LSTMCell(c.embed_dim + c.feature_dim + style_dim, c.hidden_dim)
        self.dropout = nn.Dropout(c.dropout)
        # Deep output layer (SAT eq. 7): words from hidden state, context and previous word.
        self.out_hidden = nn.Linear(c.hidden_dim, c.embed_dim)
        self.out_context = nn.Linear(c.feature_dim, c.embed_dim, bias=False)
        # The style also enters the output layer directly, so it can steer every word choice.
        self.out_style = nn.Linear(style_dim, c.embed_dim, bias=False) if style_dim else None
        self.out_words = nn.Linear(c.embed_dim, c.vocab_size)

    # --- pieces shared by training (forward) and decoding (decoding.py) ---

    def start(self, features: torch.Tensor, styles: torch.Tensor | None = None, concepts: Concepts | None = None):
        """Prepare a batch of image grids: normalised features, their attention projection,
        the style vector and the initial LSTM state."""
        features, projected, pooled, style = self.image_context(features, styles, concepts)
        pooled = pooled if style is None else torch.cat([pooled, style], 1)
        state = (torch.tanh(self.init_h(pooled)), torch.tanh(self.init_c(pooled)))
        return features, projected, style, state

    def step(self, words: torch.Tensor, state: State, features: torch.Tensor,
             projected: torch.Tensor, style: torch.Tensor | None):
        """One word: previous words (B,) -> logits (B, V), new state, attention (B, R)."""
        h, c = state
        context, alpha = self.attention(features, projected, h)
        context = torch.sigmoid(self.gate(h)) * context
        embedded = self.embed(words)
        inputs = [embedded, context] if style is None else [embedded, context, style]
        h, c = self.lstm(torch.cat(inputs, 1), (h, c))
        deep = embedded + self.out_hidden(self.dropout(h)) + self.out_context(context)
        if style is not None:
            deep = deep + self.out_style(style)
        logits = self.out_words(self.dropout(torch.tanh(deep)))
        return logits, (h, c), alpha


class UpDownDecoder(CaptionDecoder):
    """Top-down attention with two LSTMs (Anderson et al. 2018, "Up-Down"), over the encoder's grid.

    At each step t
      1. the attention LSTM reads [language LSTM's previous h; mean region feature; embedding of
         y_{t-1}; style],
      2. its new hidden state scores every region (additive attention) -> alpha_t, context z_t,
      3. the language LSTM reads [z_t; attention LSTM's h; style] and predicts y_t from its
         dropped-out hidden state (and the style).
    Both LSTMs start from zeros, as in the paper.
    """
    state_names = ("h_attention", "c_attention", "h_language", "c_language")

    def __init__(self, config: CaptionerConfig):
        super().__init__(config)
        c, style_dim = config, self.style_dim
        self.attention_lstm = nn.LSTMCell(c.hidden_dim + c.feature_dim + c.embed_dim + style_dim, c.hidden_dim)
        self.language_lstm = nn.LSTMCell(c.feature_dim + c.hidden_dim + style_dim, c.hidden_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.out_style = nn.Linear(style_dim, c.vocab_size, bias=False) if style_dim else None
        self.out_words = nn.Linear(c.hidden_dim, c.vocab_size)

    def start(self, features: torch.Tensor, styles: torch.Tensor | None = None, concepts: Concepts | None = None):
        features, projected, _, style = self.image_context(features, styles, concepts)
        state = tuple(features.new_zeros(features.size(0), self.config.hidden_dim) for _ in self.state_names)
        return features, projected, style, state

    def step(self, words: torch.Tensor, state: State, features: torch.Tensor,
             projected: torch.Tensor, style: torch.Tensor | None):
        h_att, c_att, h_lang, c_lang = state
        extra = [] if style is None else [style]
        h_att, c_att = self.attention_lstm(
            torch.cat([h_lang, features.mean(1), self.embed(words), *extra], 1), (h_att, c_att))
        context, alpha = self.attention(features, projected, h_att)
        h_lang, c_lang = self.language_lstm(torch.cat([context, h_att, *extra], 1), (h_lang, c_lang))
        logits = self.out_words(self.dropout(h_lang))
        if style is not None:
            logits = logits + self.out_style(style)
        return logits, (h_att, c_att, h_lang, c_lang), alpha


DECODERS = {"show-attend-tell": AttentionLSTMDecoder, "up-down": UpDownDecoder}


def build_decoder(config: CaptionerConfig) -> CaptionDecoder:
    """The decoder that `config.decoder` names."""
    if config.decoder not in DECODERS:
        raise ValueError(f"unknown decoder {config.decoder!r}; choose from {sorted(DECODERS)}")
    return DECODERS[config.decoder](config)


def caption_loss(logits: torch.Tensor, alphas: torch.Tensor, targets: torch.Tensor, pad: int,
                 attention_penalty: float = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy over the words plus the doubly stochastic attention penalty
    lambda * sum_regions (1 - sum_t alpha_t)^2, which asks every region to be looked at once."""
    mask = targets != pad
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                          ignore_index=pad, label_smoothing=label_smoothing)
    if attention_penalty == 0:
        return nll
    coverage = (alphas.float() * mask.unsqueeze(2)).sum(1)  # (B, R)
    return nll + attention_penalty * ((1.0 - coverage) ** 2).mean()
