"""Collaborative-filtering encoders (MF, LightGCN; SASRec is in the payload) and their training."""
