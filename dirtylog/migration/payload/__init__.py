"""What a migration carries: page batches built from guest memory and applied to it, zero pages, digests.

``pages`` turns runs of page numbers and page data into PageBatch events and back (compression included);
``digest`` fingerprints pages in compiled passes and keeps the memory digest; ``memory`` is the
destination's copy of guest memory as it fills.
"""
