// (filled by the CUDA op work)
