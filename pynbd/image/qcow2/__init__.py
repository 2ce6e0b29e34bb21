"""The qcow2 driver (v2 and v3), with backing chains, dirty bitmaps and compression.

One module per job:

``header``       header, header extensions and snapshot table: parsing and validation
``l2cache``      the bounded LRU cache of L2 tables shared by a chain's layers
``compression``  compressed cluster descriptors and their decompression
``bitmaps``      persistent dirty bitmaps: parsing the directory, loading the bits
``tableruns``    one L2 table's block-status runs, classified once and cached with it
``layer``        one qcow2 file: L1 → L2 → cluster lookups, classified into runs
``chain``        backing chains: the layer interface, raw backing files, the walk
``image``        :class:`Qcow2Image` and :func:`open_qcow2`, the driver entry point
``refcounts``    the refcount table and blocks, the host cluster allocator
``writer``       writes to the top image: allocation, copy-on-write, zeroing, trims
``writeback``    the changed L2/L1 tables, written back in dependency order at a flush
``subclusters``  writes to images with extended L2 entries
``datafile``     writes to an external data file
``census``       counting the references to each host cluster: the refcounts a file should have
``repair``       recounting the refcounts of an image left dirty (lazy refcounts)
``recording``    writes recorded in the enabled bitmaps; in-use flags; storing them
``bitmapstore``  writing bitmap data clusters, tables and the directory in place
``bitmapdir``    changing the bitmap directory all or nothing (offline and live)
``bitmapops``    QMP's bitmap operations on a served image
"""

from pynbd.image.qcow2.image import Qcow2Image, open_chain, open_qcow2
from pynbd.image.qcow2.l2cache import TableCache
from pynbd.image.qcow2.layer import Qcow2Layer

__all__ = ["Qcow2Image", "Qcow2Layer", "TableCache", "open_chain", "open_qcow2"]
