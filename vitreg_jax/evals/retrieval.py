"""Image-text retrieval recall@k (OpenCLIP's ``retrieval`` metric, one caption per image).

Pair ``i`` is image ``i`` with caption ``i``. Image -> text: a hit at ``k`` when
caption ``i`` is among the ``k`` captions most similar to image ``i``; text ->
image the other way round. Ties count against the query (a caption as similar
as the right one ranks ahead of it), so constant embeddings score 0, not 100.
"""

import numpy as np


def _ranks(similarity: np.ndarray) -> np.ndarray:
  """Per row, how many columns other than the diagonal's score at least as high as it."""
  return (similarity >= np.diag(similarity)[:, None]).sum(axis=1) - 1


def recall_at_k(image_embeds, text_embeds, ks=(1, 5, 10)) -> dict[str, float]:
  """``{'image_to_text_r@k': %, 'text_to_image_r@k': %}`` of paired, unit-norm embeddings."""
  image_embeds, text_embeds = np.asarray(image_embeds), np.asarray(text_embeds)
  if image_embeds.ndim != 2 or image_embeds.shape != text_embeds.shape:
    raise ValueError(f'retrieval needs paired [N, E] embeddings; got images {image_embeds.shape}, '
                     f'texts {text_embeds.shape}')
  similarity = image_embeds @ text_embeds.T
  ranks = {'image_to_text': _ranks(similarity), 'text_to_image': _ranks(similarity.T)}
  return {f'{direction}_r@{k}': float(100.0 * np.mean(rank < k))
          for direction, rank in ranks.items() for k in ks}


def top_matches(image_embeds, text_embeds, k: int = 3) -> np.ndarray:
  """Indices [N, k] of each image's ``k`` most similar texts, best first."""
  similarity = np.asarray(image_embeds) @ np.asarray(text_embeds).T
  return np.argsort(-similarity, axis=1, kind='stable')[:, :k]
