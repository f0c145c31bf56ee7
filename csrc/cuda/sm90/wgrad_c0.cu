// Weight-gradient grouped GEMM (per expert (X, Y, rows_e); A = a_NX's rows transposed, B = g_NY's
// rows), configuration 0: 128 x 256 x 64 CTA tile, cluster 2 x 1, cooperative warp groups.
#include "grouped_gemm_sm90.cuh"

using WgradTile0 = moe::cuda::sm90::TileConfig<128, 256, 64, 2, false>;
MOE_SM90_WGRAD(0, ::WgradTile0)
