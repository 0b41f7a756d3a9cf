/* The daemon's heap: handed back to the system every few seconds, and
 * reported on stderr on SIGUSR1. */
#ifndef CAPSAFS_HEAP_H
#define CAPSAFS_HEAP_H

#include "loop.h"

/* Start both; call with the big lock held, after the loop thread started. */
int heap_init(struct loop *l);
/* Stop the SIGUSR1 report (the signal is ignored from then on); with the big lock. */
void heap_fini(void);

#endif
