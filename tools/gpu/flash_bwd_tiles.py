"""The tile logic of the Hopper flash backward (kernels/flash_sm90.cu: flash_bwd_dkdv_wg[_split],
flash_bwd_dq_wg) replayed in float64 with numpy, against dense attention gradients: the blocks,
the (head, query tile) and key-tile loops, the causal start, the edge flags and masks, the TMA
boxes' zero fill (3-d per head, 1-d over the flat lse / delta), the GQA and split indexing. It
checks what a GPU-less session can check of a kernel change; the shared-memory layouts, the
wgmma fragments and descriptors need the GPU test (flash_bwd_wgmma_matches_cpu).

    python3 tools/gpu/flash_bwd_tiles.py     # one line per shape: dk, dv (whole, split), dq errors
"""
import numpy as np
NEG=-np.inf
def ref(q,k,v,g,causal,scale):
    B,Hq,Tq,D=q.shape; Hkv,Tk=k.shape[1],k.shape[2]; grp=Hq//Hkv
    kk=np.repeat(k,grp,1); vv=np.repeat(v,grp,1)
    s=np.einsum('bhqd,bhkd->bhqk',q,kk)*scale
    off=Tk-Tq
    if causal:
        m=np.arange(Tk)[None,:]>np.arange(Tq)[:,None]+off
        s=np.where(m,NEG,s)
    mx=s.max(-1,keepdims=True); mx=np.where(np.isinf(mx),0,mx)
    e=np.exp(s-mx); l=e.sum(-1,keepdims=True)
    p=np.where(l>0,e/np.where(l>0,l,1),0)
    lse=np.where(l[...,0]>0,mx[...,0]+np.log(np.where(l[...,0]>0,l[...,0],1)),NEG)
    o=np.einsum('bhqk,bhkd->bhqd',p,vv)
    dp=np.einsum('bhqd,bhkd->bhqk',g,vv)
    delta=(g*o).sum(-1)
    ds=p*(dp-delta[...,None])
    dq=np.einsum('bhqk,bhkd->bhqd',ds,kk)*scale
    dk=np.einsum('bhqk,bhqd->bhkd',ds,q).reshape(B,Hkv,grp,Tk,D).sum(2)*scale
    dv=np.einsum('bhqk,bhqd->bhkd',p,g).reshape(B,Hkv,grp,Tk,D).sum(2)
    return lse,delta,dq,dk,dv

def rows(x,h,r0,n,T):  # TMA box: rows r0..r0+n of head h, zeros past T
    out=np.zeros((n,x.shape[-1]))
    hi=min(T,r0+n)
    if hi>r0: out[:hi-r0]=x[h,r0:hi]
    return out
def flat(x,start,n):  # 1-d TMA box over the flat array, zeros past the end
    f=x.reshape(-1); out=np.zeros(n); hi=min(len(f),start+n)
    if hi>start: out[:hi-start]=f[start:hi]
    return out

def dkdv_wg(q,k,v,g,lse,delta,causal,scale,split):
    B,Hq,Tq,D=q.shape; Hkv,Tk=k.shape[1],k.shape[2]; grp=Hq//Hkv
    qf=q.reshape(B*Hq,Tq,D); gf=g.reshape(B*Hq,Tq,D); kf=k.reshape(B*Hkv,Tk,D); vf=v.reshape(B*Hkv,Tk,D)
    parts=np.zeros((2,B,Hq if split else Hkv,Tk,D))
    sl2=scale*np.log2(np.e)
    for b in range(B):
     for by in range(Hq if split else Hkv):
      for bx in range((Tk+127)//128):
        k0=bx*128
        hk=by//grp if split else by
        g0,g1=(by%grp,by%grp+1) if split else (0,grp)
        off=Tk-Tq; qstart=0
        if causal:
            first=k0-off
            qstart=(first//64)*64 if first>0 else 0
        nq=(Tq-qstart+63)//64 if Tq>qstart else 0
        n=(g1-g0)*nq
        K=rows(kf,b*Hkv+hk,k0,128,Tk); V=rows(vf,b*Hkv+hk,k0,128,Tk)
        dk=np.zeros((128,D)); dv=np.zeros((128,D))
        for i in range(n):
            bh=b*Hq+hk*grp+g0+i//nq; q0=qstart+(i%nq)*64
            Q=rows(qf,bh,q0,64,Tq); G=rows(gf,bh,q0,64,Tq)
            L=flat(lse,bh*Tq+q0,64); DL=flat(delta,bh*Tq+q0,64)
            st=K@Q.T; dpt=V@G.T
            edge=q0+64>Tq or k0+128>Tk or (causal and k0+127>q0+off)
            lx=np.where(L==NEG,np.inf,L*np.log2(np.e))
            with np.errstate(over='ignore'):
                P=np.exp2(st*sl2-lx[None,:])
            if edge:
                key=k0+np.arange(128)[:,None]; qi=q0+np.arange(64)[None,:]
                m=(key>=Tk)|(qi>=Tq)|((key>qi+off) if causal else False)
                P=np.where(m,0,P)
            ds=P*(dpt-DL[None,:])
            dv+=P@G; dk+=ds@Q
        nk=min(128,Tk-k0)
        parts[0,b,by,k0:k0+nk]=dk[:nk]*scale; parts[1,b,by,k0:k0+nk]=dv[:nk]
    if split:
        parts=parts.reshape(2,B,Hkv,grp,Tk,D).sum(3)
    return parts[0],parts[1]

def dq_wg(q,k,v,g,lse,delta,causal,scale):
    B,Hq,Tq,D=q.shape; Hkv,Tk=k.shape[1],k.shape[2]; grp=Hq//Hkv
    qf=q.reshape(B*Hq,Tq,D); gf=g.reshape(B*Hq,Tq,D); kf=k.reshape(B*Hkv,Tk,D); vf=v.reshape(B*Hkv,Tk,D)
    dq=np.zeros_like(q); sl2=scale*np.log2(np.e); BN=128
    nb=(Tq+127)//128
    for b in range(B):
     for h in range(Hq):
      for bx in range(nb):
        qt=nb-1-bx if causal else bx
        q0=qt*128; bhq=b*Hq+h; bhk=b*Hkv+h//grp
        off=Tk-Tq; kend=Tk
        if causal: kend=min(kend,q0+128+off)
        nt=(kend+BN-1)//BN if kend>0 else 0
        Q=rows(qf,bhq,q0,128,Tq); G=rows(gf,bhq,q0,128,Tq)
        r=q0+np.arange(128)
        l=np.where(r<Tq,lse[b,h][np.minimum(r,Tq-1)],NEG)
        nl=np.where(l==NEG,NEG,-l*np.log2(np.e))
        dl=np.where(r<Tq,delta[b,h][np.minimum(r,Tq-1)],0)
        acc=np.zeros((128,D))
        for i in range(nt):
            k0=i*BN
            K=rows(kf,bhk,k0,BN,Tk); V=rows(vf,bhk,k0,BN,Tk)
            s=Q@K.T; dp=G@V.T
            with np.errstate(over='ignore'):
                P=np.exp2(s*sl2+nl[:,None])
            P=np.where(nl[:,None]==NEG,0,P)
            for ci in range(2):
              for w in range(4):
                warp_row=q0+ci*64+w*16
                edge=k0+BN>Tk or (causal and k0+BN-1>warp_row+off)
                if edge:
                    sl=slice(ci*64+w*16,ci*64+w*16+16)
                    key=k0+np.arange(BN)[None,:]; row=warp_row+np.arange(16)[:,None]
                    m=(key>=Tk)|((key>row+off) if causal else False)
                    P[sl]=np.where(m,0,P[sl])
            ds=P*(dp-dl[:,None])
            acc+=ds@K
        n=min(128,Tq-q0)
        dq[b,h,q0:q0+n]=acc[:n]*scale
    return dq

def main():
    rng = np.random.default_rng(0)
    cases = [(1, 2, 2, 64, 64, 64, False), (2, 4, 2, 37, 37, 64, True), (1, 4, 1, 100, 129, 128, True),
             (1, 3, 3, 1, 77, 128, True), (1, 2, 2, 70, 50, 64, True), (1, 4, 2, 300, 300, 128, True),
             (1, 2, 2, 257, 513, 64, False), (1, 2, 1, 129, 300, 128, False), (1, 8, 1, 256, 256, 128, True),
             (1, 4, 2, 200, 130, 64, True), (1, 2, 2, 300, 40, 64, True)]
    worst = 0.0
    for (B, Hq, Hkv, Tq, Tk, D, causal) in cases:
        q, g = rng.standard_normal((B, Hq, Tq, D)), rng.standard_normal((B, Hq, Tq, D))
        k, v = rng.standard_normal((B, Hkv, Tk, D)), rng.standard_normal((B, Hkv, Tk, D))
        sc = 1 / np.sqrt(D)
        lse, delta, dq, dk, dv = ref(q, k, v, g, causal, sc)
        rel = lambda a, b: np.abs(a - b).max() / max(np.abs(b).max(), 1e-6)
        errs = []
        for split in [False, True]:
            dk2, dv2 = dkdv_wg(q, k, v, g, lse, delta, causal, sc, split)
            errs += [rel(dk2, dk), rel(dv2, dv)]
        errs.append(rel(dq_wg(q, k, v, g, lse, delta, causal, sc), dq))
        worst = max(worst, max(errs))
        print(f"b{B} hq{Hq} hkv{Hkv} tq{Tq} tk{Tk} d{D} causal={causal}: dk dv {errs[0]:.1e} {errs[1]:.1e}, "
              f"split {errs[2]:.1e} {errs[3]:.1e}, dq {errs[4]:.1e}")
    if worst > 1e-12:
        raise SystemExit(f"tile logic differs from the dense gradients: worst relative error {worst:.2e}")


if __name__ == "__main__":
    main()
