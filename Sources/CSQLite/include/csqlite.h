/* The system SQLite (libsqlite3-dev). SQLITE_TRANSIENT is a macro Swift
 * cannot import, so it is exposed as a function. */
#ifndef TAPIO_CSQLITE_H
#define TAPIO_CSQLITE_H
#include <sqlite3.h>

/* Bind a text/blob that SQLite must copy before the call returns. */
int tapio_sqlite_bind_text(sqlite3_stmt *stmt, int index, const char *text, int bytes);
int tapio_sqlite_bind_blob(sqlite3_stmt *stmt, int index, const void *data, int bytes);
#endif
