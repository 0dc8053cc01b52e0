"""What the tests and the benchmarks start and make: real servers, a cutting proxy, test data.

- ``iss_testing.servers``: ports, tools, waiting, and the processes on loopback
  (``Gunicorn``, ``Nginx``, ``SeaweedFS``, ``PostgreSQL``);
- ``iss_testing.proxy``: ``CuttingProxy``, a TCP relay that breaks a connection once;
- ``iss_testing.data``: test images, content ids, the files a file store holds;
- ``iss_testing.cli``: the command line (``python -m iss``) and a form upload through WebTest.

conftest.py holds only the fixtures built on these. The benchmarks import them too
(``python -m bench.s3`` from the checkout's root).
"""

import pathlib

#: The checkout's root: where iss.py, gunicorn.conf.py and deploy/ are.
HERE = pathlib.Path(__file__).resolve().parent.parent
