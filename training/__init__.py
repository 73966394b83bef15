"""Fine-tuning for napari-cellseg models (the Kaggle Sartorius starter recipe)."""
