"""The bundled default model (weights + model card); see MODEL_CARD.md."""
