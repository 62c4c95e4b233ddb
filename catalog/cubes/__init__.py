"""Cube chunk storage: how an image's arrays lie on disk, how ingest writes them and how loaders read them back.

Every image is a Zarr v3 group (see catalog/catalog.py); its ``cube`` array is ``(band, y, x)`` in the smallest
lossless dtype, cut into chunks of ``band_group`` bands x ``chunk_xy`` x ``chunk_xy`` pixels, each chunk encoded as
little-endian bytes, optionally compressed with Blosc, and closed by a CRC-32C (Zarr v3's ``crc32c`` codec), so
any Zarr v3 reader can read the catalog and every chunk is verified whenever it is read. Beside the cube lie its
band coordinates ``wavelength`` (and ``fwhm``), named by the cube's CF ``coordinates`` attribute so that plain
xarray decodes them as coordinates of ``band``. The layout is recorded in each group (``layout_version``,
``layout``); groups without it are layout 1 (all bands x 64 x 64, Blosc lz4 + bitshuffle, no checksum) and still
read, without a checksum to verify.

The default (chosen from ``bench/loader.py``'s layout table; catalog/README.md has the table and the reasoning):
all bands x 64 x 64 px chunks in 1024 x 1024 px shards, raw bytes (no compressor), CRC-32C per chunk.

- **No compression**: noisy 12-16-bit sensor data barely compresses with codecs fast enough to feed a GPU
  (bit-shuffle + zstd reads 2-7x slower for 0.6-0.7x the bytes); disk is saved by the dtype instead (integer-valued
  floats are stored as integers).
- **All bands x 64 px**: a training crop needs every band of a window; 64 px keeps a 128 px crop at 9 chunks and a
  512 px crop at 1.27x over-read.
- **1024 px shards**: reads cost the same as with a file per chunk, and an image is one file instead of hundreds.
- **CRC-32C**: > 10 GB/s per core, and it catches a flipped byte that would still decode.

Modules (import each name from the module that defines it; this package re-exports nothing):

- ``layout``: ``CubeLayout`` (chunk and shard geometry, codec, checksum; how a chunk is encoded), ``LAYOUT_VERSION``
- ``files``: ``FileAccess`` (memory-mapped local files, fsspec elsewhere), ``zarr_store``
- ``metadata``: ``ArrayInfo`` / ``parse_array_meta`` (an array's ``zarr.json`` for the direct reader), the band
  coordinates (``BAND_COORDINATES``, ``band_coordinates``, ``coordinates_attr``), ``jsonable`` group attributes
- ``cache``: ``ChunkCache``, the per-process cache of decoded, verified chunks
- ``regions``: read requests planned per chunk (``normalise_region``, ``plan_chunks``, ``Piece``)
- ``reader``: ``CubeReader``, the direct checksummed reader of crops, images and batches
- ``dtypes``: the smallest lossless storage dtype (``lossless_dtype``, ``dtype_sample``)
- ``writer``: ``CubeWrite`` and ``write_group``, the streaming writer
- ``xarray_view``: ``open_dataarray``, the lazy xarray view over the reader

Batches on a GPU (pinned staging, crops cut on the device) are the pretraining stage's: stages/pretraining/
device_batches.py. The catalog imports no torch.
"""
