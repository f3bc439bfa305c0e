"""The IBTA transport, sans-IO: header codecs, opcode table, ICRC, RoCEv2
framing and the RC / UD protocol engines.

Kernel counterparts: ``drivers/infiniband/sw/rxe`` (``rxe_hdr.h``,
``rxe_opcode.c``, ``rxe_icrc.c``, ``rxe_req.c``, ``rxe_resp.c``,
``rxe_comp.c``).
"""
