/* aiod4p._speedups: the per-item loops of keyed routing and of choosing how to pickle, in C.
 *
 * aiod4p/_groupings.py holds the same contracts in Python and uses them when this
 * module was not built (no C compiler at install time); tests run both. Without
 * it, memo_free answers False (aiod4p/transports/_base.py): messages keep the memo.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

PyDoc_STRVAR(deal_by_key_doc,
"deal_by_key(items, key, destinations, count, /)\n"
"--\n"
"\n"
"Deal ``items`` (a list) into ``count`` lists by ``destinations[k]``, where\n"
"``k`` is ``key(item)`` for a callable ``key``, else ``item[key]``.\n"
"\n"
"Returns the lists, each keeping the items' order, or None when some item's\n"
"key is not in ``destinations`` (a dict of ints in ``range(count)``), when\n"
"finding or hashing a key raised an Exception, or when ``key`` changed the\n"
"list's length: the caller then sorts the batch out itself. Other\n"
"BaseExceptions (KeyboardInterrupt, SystemExit) propagate.");

PyDoc_STRVAR(keys_evaluate_doc,
"keys_evaluate(items, key, /)\n"
"--\n"
"\n"
"Whether every item of ``items`` (a list) has a key: ``key(item)`` for a\n"
"callable ``key``, else ``item[key]``, without raising an Exception. Other\n"
"BaseExceptions propagate.");

/* How a key is found: by calling the key function, by a non-negative int index into an exact tuple or list
 * (read in place; any other item is indexed as Python would), or by indexing with any other index. */
typedef struct {
    PyObject *key;
    Py_ssize_t index; /* >= 0: an int index */
    int call;
} KeyOf;

static int
key_of_init(KeyOf *key_of, PyObject *key)
{
    key_of->key = key;
    key_of->call = PyCallable_Check(key);
    key_of->index = -1;
    if (!key_of->call && PyLong_CheckExact(key)) {
        Py_ssize_t index = PyLong_AsSsize_t(key);
        if (index == -1 && PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                return -1;
            }
            PyErr_Clear(); /* a huge index: Python's indexing raises IndexError */
        }
        key_of->index = index;
    }
    return 0;
}

/* The key of ``item``, a new reference; NULL with an exception set. */
static inline PyObject *
key_of_item(const KeyOf *key_of, PyObject *item)
{
    if (key_of->index >= 0) {
        if (PyTuple_CheckExact(item) && key_of->index < PyTuple_GET_SIZE(item)) {
            return Py_NewRef(PyTuple_GET_ITEM(item, key_of->index));
        }
        if (PyList_CheckExact(item) && key_of->index < PyList_GET_SIZE(item)) {
            return Py_NewRef(PyList_GET_ITEM(item, key_of->index));
        }
    }
    if (key_of->call) {
        return PyObject_CallOneArg(key_of->key, item);
    }
    return PyObject_GetItem(item, key_of->key);
}

/* On a pending error: an Exception is swallowed (the caller redoes the batch), anything else propagates. */
static PyObject *
give_up(void)
{
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    return NULL;
}

/* The destination of each item, then the lists made at their final sizes and filled: no list grows. The items
 * are held from the first pass to the second: making a list may run the garbage collector, and any code
 * (a __del__) that may change ``items``. */
static PyObject *
deal_by_key(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "deal_by_key() takes 4 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *items = args[0], *destinations = args[2];
    if (!PyList_Check(items) || !PyDict_Check(destinations)) {
        PyErr_SetString(PyExc_TypeError, "deal_by_key() takes a list, a key, a dict and an int");
        return NULL;
    }
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count < 1) {
        PyErr_SetString(PyExc_ValueError, "deal_by_key() needs a count of at least 1");
        return NULL;
    }
    KeyOf key_of;
    if (key_of_init(&key_of, args[1]) < 0) {
        return NULL;
    }
    Py_ssize_t length = PyList_GET_SIZE(items);
    PyObject **held = PyMem_New(PyObject *, length ? length : 1); /* a reference to each item taken */
    Py_ssize_t *chosen = PyMem_New(Py_ssize_t, length ? length : 1);
    Py_ssize_t *sizes = PyMem_Calloc(count, sizeof(Py_ssize_t));
    Py_ssize_t taken = 0;
    PyObject *parts = NULL;
    if (held == NULL || chosen == NULL || sizes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; taken < length; taken++) {
        PyObject *item = held[taken] = Py_NewRef(PyList_GET_ITEM(items, taken));
        PyObject *found = key_of_item(&key_of, item);
        if (found == NULL) {
            taken++;
            parts = give_up();
            goto done;
        }
        /* A key's __hash__ or __eq__ may run any Python code: ``found`` is held meanwhile. */
        PyObject *destination = PyDict_GetItemWithError(destinations, found); /* borrowed */
        Py_ssize_t to = -1;
        if (destination != NULL) {
            to = PyLong_AsSsize_t(destination);
        }
        Py_DECREF(found);
        if (to == -1 && PyErr_Occurred()) {
            taken++;
            parts = give_up();
            goto done;
        }
        /* A key function that changed the list: the caller deals it again. */
        if (to < 0 || to >= count || PyList_GET_SIZE(items) != length) {
            taken++;
            parts = Py_NewRef(Py_None);
            goto done;
        }
        chosen[taken] = to;
        sizes[to]++;
    }
    parts = PyList_New(count);
    if (parts == NULL) {
        goto done;
    }
    for (Py_ssize_t to = 0; to < count; to++) {
        PyObject *part = PyList_New(sizes[to]);
        if (part == NULL) {
            Py_CLEAR(parts);
            goto done;
        }
        PyList_SET_ITEM(parts, to, part);
        sizes[to] = 0; /* from here on: how many items each part holds */
    }
    for (Py_ssize_t index = 0; index < length; index++) { /* each held reference moves into its part */
        Py_ssize_t to = chosen[index];
        PyList_SET_ITEM(PyList_GET_ITEM(parts, to), sizes[to]++, held[index]);
    }
    taken = 0;
done:
    for (Py_ssize_t index = 0; index < taken; index++) {
        Py_DECREF(held[index]);
    }
    PyMem_Free(held);
    PyMem_Free(chosen);
    PyMem_Free(sizes);
    return parts;
}

static PyObject *
keys_evaluate(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "keys_evaluate() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *items = args[0];
    if (!PyList_Check(items)) {
        PyErr_SetString(PyExc_TypeError, "keys_evaluate() takes a list and a key");
        return NULL;
    }
    KeyOf key_of;
    if (key_of_init(&key_of, args[1]) < 0) {
        return NULL;
    }
    /* A key function may change the list: its size is read again each turn. */
    for (Py_ssize_t index = 0; index < PyList_GET_SIZE(items); index++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(items, index));
        PyObject *found = key_of_item(&key_of, item);
        Py_DECREF(item);
        if (found == NULL) {
            if (PyErr_ExceptionMatches(PyExc_Exception)) {
                PyErr_Clear();
                Py_RETURN_FALSE;
            }
            return NULL;
        }
        Py_DECREF(found);
    }
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(memo_free_doc,
"memo_free(message, /)\n"
"--\n"
"\n"
"Whether ``message`` pickles faster without the pickler's memo, and to about\n"
"the same size: a tree of exact lists and tuples, at most 6 levels deep,\n"
"whose leaves are str and bytes of at most 1 KiB, int, float, bool or None,\n"
"holding at least as many lists and tuples as strings and bytes (the memo\n"
"costs each container more than it saves; a string repeated in the message\n"
"is written once with it). Without the memo, a part referenced twice is\n"
"written twice: a message with a part next to itself (``[part] * n``), more\n"
"than 2**18 parts, or more than 4 MiB of strings and bytes keeps the memo.");

#define MEMO_FREE_DEPTH 6
#define MEMO_FREE_LEAF_BYTES 1024
#define MEMO_FREE_NODES (1 << 18)
#define MEMO_FREE_BYTES (4 << 20)

typedef struct {
    Py_ssize_t containers_less_strings;
    Py_ssize_t nodes; /* left to visit */
    Py_ssize_t bytes; /* of strings and bytes left to visit */
} Walk;

/* 1 where the tree is plain data within the walk's budgets, else 0. */
static int
plain_tree(PyObject *node, int depth, Walk *walk)
{
    if (--walk->nodes < 0) {
        return 0;
    }
    PyTypeObject *type = Py_TYPE(node);
    if (type == &PyLong_Type || type == &PyFloat_Type || node == Py_None || type == &PyBool_Type) {
        return 1;
    }
    if (type == &PyUnicode_Type || type == &PyBytes_Type) {
        Py_ssize_t size = type == &PyUnicode_Type ? PyUnicode_GET_LENGTH(node) : PyBytes_GET_SIZE(node);
        walk->containers_less_strings--;
        walk->bytes -= size;
        return size <= MEMO_FREE_LEAF_BYTES && walk->bytes >= 0;
    }
    if (depth == 0) {
        return 0;
    }
    PyObject **elements;
    Py_ssize_t length;
    if (type == &PyTuple_Type) {
        elements = ((PyTupleObject *)node)->ob_item;
        length = PyTuple_GET_SIZE(node);
    }
    else if (type == &PyList_Type) {
        elements = ((PyListObject *)node)->ob_item;
        length = PyList_GET_SIZE(node);
    }
    else {
        return 0;
    }
    walk->containers_less_strings++;
    for (Py_ssize_t index = 0; index < length; index++) {
        PyObject *element = elements[index];
        int container = PyTuple_CheckExact(element) || PyList_CheckExact(element);
        if (container && index > 0 && element == elements[index - 1]) {
            return 0; /* [part] * n */
        }
        if (!plain_tree(element, depth - 1, walk)) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
memo_free(PyObject *module, PyObject *message)
{
    Walk walk = {0, MEMO_FREE_NODES, MEMO_FREE_BYTES};
    return PyBool_FromLong(plain_tree(message, MEMO_FREE_DEPTH, &walk) && walk.containers_less_strings >= 0);
}

static PyMethodDef speedups_methods[] = {
    {"deal_by_key", (PyCFunction)(void (*)(void))deal_by_key, METH_FASTCALL, deal_by_key_doc},
    {"keys_evaluate", (PyCFunction)(void (*)(void))keys_evaluate, METH_FASTCALL, keys_evaluate_doc},
    {"memo_free", memo_free, METH_O, memo_free_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef_Slot speedups_slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "aiod4p._speedups",
    .m_doc = "The per-item loops of keyed routing and of choosing how to pickle, in C.",
    .m_size = 0,
    .m_methods = speedups_methods,
    .m_slots = speedups_slots,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModuleDef_Init(&speedups_module);
}
