"""Ingest: trainer lines and posted samples into bpb_samples, bad ones into quarantine.

``parse`` is pure (L-R8 and the value rules); ``writer.SampleWriter`` batches many sources into
multi-row writes with the per-trial summary and one NOTIFY per batch; ``http.routes`` is
``POST /v1/samples`` for the daemon's HTTP app.
"""
